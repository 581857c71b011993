"""``model.pt``: the trained weights with everything needed to use them.

Training writes it; evaluation, prediction, fine-tuning (``model.init_from``) and the MLflow model
read it. It holds the state dict, the ``DANetConfig``, the classes and palette, the mean/std the
model was trained with, the dataset, and provenance (the val mIoU, iteration, MLflow run, the
shards' and code's digests). Loaded with ``weights_only=True``: a model file cannot run code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from danet import DANetConfig, build_danet
from danet.model import Segmenter
from pipeline.errors import ModelError, first_line
from pipeline.modelrefs import parse_model_ref


@dataclass(frozen=True)
class ModelInfo:
    """What a model file says about its model."""

    config: DANetConfig
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str
    meta: dict[str, Any] = field(default_factory=dict)  # val_miou, iteration, mlflow_run_id, ...

    @property
    def best_val_miou(self) -> float:
        """The training run's own validation at its best evaluation (pipeline/scores.py); the
        file keeps it as ``meta["val_miou"]``."""
        return float(self.meta.get("val_miou", math.nan))


def save_bytes(obj: Any, path: Path) -> None:
    """``torch.save`` through Python's file I/O, so a full disk is an ``OSError`` (ENOSPC) that
    names the file, not torch's ``PytorchStreamWriter`` RuntimeError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


def save_model_file(path: Path, state: dict[str, torch.Tensor], info: ModelInfo) -> None:
    save_bytes(
        {
            "model": state,
            "model_config": dataclasses.asdict(info.config),
            "classes": list(info.classes),
            "palette": [list(c) for c in info.palette],
            "mean": list(info.mean),
            "std": list(info.std),
            "dataset": info.dataset,
            **info.meta,
        },
        path,
    )


_KNOWN = {"model", "model_config", "classes", "palette", "mean", "std", "dataset"}


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelError(path, "model file does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    # any error of torch's unpickler on arbitrary bytes (it raises IndexError, KeyError, ...)
    except Exception as err:
        raise ModelError(path, f"not a valid DANet model file ({first_line(err)})") from None
    if not isinstance(payload, dict) or not set(payload) >= _KNOWN:
        raise ModelError(path, "not a DANet model file (written by danet train)")
    return payload


def read_model_info(path: str | Path) -> ModelInfo:
    """The metadata of a model file, without building the model."""
    payload = _read(Path(path))
    try:
        cfg = dict(payload["model_config"])
        if cfg.get("multi_grid") is not None:
            cfg["multi_grid"] = tuple(cfg["multi_grid"])
        config = DANetConfig(**{**cfg, "pretrained": False, "pretrained_path": None})
        return ModelInfo(
            config=config,
            classes=tuple(payload["classes"]),
            palette=tuple((int(c[0]), int(c[1]), int(c[2])) for c in payload["palette"]),
            mean=tuple(float(v) for v in payload["mean"]),
            std=tuple(float(v) for v in payload["std"]),
            dataset=str(payload["dataset"]),
            meta={k: v for k, v in payload.items() if k not in _KNOWN},
        )
    except (TypeError, ValueError, KeyError, IndexError) as err:
        raise ModelError(path, f"not a valid DANet model file ({first_line(err)})") from None


def load_state(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelInfo]:
    """The state dict and metadata of a model file: every weight finite, one class per output
    channel and a colour per class."""
    state, info = _read(Path(path))["model"], read_model_info(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(path, "not a valid DANet model file (its weights are not tensors)")
    bad = next(
        (k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()), None
    )
    if bad is not None:
        raise ModelError(path, f"weight {bad} holds NaN or infinite values: a diverged model")
    if len(info.classes) != info.config.num_classes or len(info.palette) != len(info.classes):
        raise ModelError(
            path,
            f"{len(info.classes)} class names and {len(info.palette)} colours for a model of "
            f"{info.config.num_classes} classes",
        )
    return state, info


def load_model_file(path: str | Path) -> tuple[Segmenter, ModelInfo]:
    """A model file -> the inference module (eval mode, RGB in [0, 1]) and its metadata."""
    state, info = load_state(path)
    model = build_danet(info.config)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ModelError(path, f"weights do not fit the model ({first_line(err)})") from None
    return Segmenter(model, info.mean, info.std).eval(), info


def palette_of(values: Sequence[Sequence[int]]) -> tuple[tuple[int, int, int], ...]:
    return tuple((int(c[0]), int(c[1]), int(c[2])) for c in values)


def file_sha256(path: Path) -> str:
    """The sha256 of a file (a model.pt, an exported .onnx), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_run(ref: str) -> str:
    """The MLflow run a model file names (its training run); "" for any other reference."""
    parsed = parse_model_ref(ref)
    if parsed.kind != "file":
        return ""
    return str(read_model_info(parsed.path).meta.get("mlflow_run_id", ""))
