"""Images -> colour masks and overlays, from any model reference (file, MLflow run, registry).

The preprocessing is evaluation's (danet/inference.py): RGB in [0, 1] into a ``Segmenter``
that normalises itself; an image whose long side exceeds ``slide_above`` goes through the sliding
window instead of one whole-image pass. Per image ``<stem>_mask.png`` (the dataset's palette),
``<stem>_overlay.png`` and ``<stem>_labels.png`` (single-channel train ids, for programs) are
written, each atomically. A file that is not a readable image is reported and skipped; the rest
are still processed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from danet.inference import label_map, protocol_for
from pipeline.artifacts.refs import LoadedModel
from pipeline.config import ConfigError, PredictParams
from pipeline.errors import DataError, ServiceError
from pipeline.images import TooLarge, decode_rgb, read_file
from pipeline.outputs import atomic_file, check_output, check_outside
from pipeline.pictures import colorize, overlay

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class PredictReport:
    written: list[Path] = field(default_factory=list)  # three files per image
    failed: list[tuple[Path, str]] = field(default_factory=list)
    images: int = 0

    def describe(self, out: str | Path) -> tuple[str, str]:
        """What ``danet predict`` prints: an error line per failed file (stderr), the count."""
        errors = "\n".join(f"error: {path}: {problem}" for path, problem in self.failed)
        return errors, f"{self.images} images -> {out}/ ({len(self.failed)} failed)"


def predict_from_params(
    params: PredictParams, inputs: Sequence[str | Path], tracking_uri: str
) -> PredictReport:
    """``danet predict``: the images of ``inputs`` through ``params.model`` into ``params.out``."""
    from pipeline.artifacts.onnxfile import load_any_model
    from pipeline.devices import pick_device

    if not params.model:
        raise ConfigError("predict.model: give the model to predict with (--model)")
    device = pick_device(params.device, "predict.device")
    model = load_any_model(params.model, tracking_uri, device)
    return predict_files(model, inputs, Path(params.out), params, device)


def expand_inputs(inputs: Sequence[str | Path]) -> Iterator[Path]:
    """Files as given; folders -> every file inside (sorted), images or not (bad ones are reported)."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            yield from sorted(
                p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
            )
        else:
            yield path


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8; ``ValueError`` naming the problem for anything that is not an image."""
    try:
        data = read_file(path)
    except DataError:
        raise ValueError("does not exist or is not a regular file") from None
    try:
        return decode_rgb(data)
    except TooLarge as err:
        raise ValueError(f"too large to decode safely ({err})") from None


def _save(array: np.ndarray, path: Path) -> None:
    with atomic_file(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def predict_files(
    model: LoadedModel,
    inputs: Sequence[str | Path],
    out: Path,
    params: PredictParams | None = None,
    device: torch.device | None = None,
    progress: bool = True,
) -> PredictReport:
    """Predict every image of ``inputs`` into ``out`` by ``params``' protocol (the predict
    section's defaults if None); bad files are collected, not raised."""
    params = params or PredictParams()
    check_output(out, "predict.out")
    check_outside(out, {f"folder {i + 1}": p for i, p in enumerate(inputs) if Path(p).is_dir()})
    device = device or torch.device("cpu")
    model.module.to(device).eval()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ServiceError(
            f"predict.out {out}: cannot create the folder ({err.strerror or err})"
        ) from None
    report = PredictReport()
    files = list(expand_inputs(inputs))
    used: set[str] = set()
    for path in tqdm(files, desc="predict", unit="img", disable=None if progress else True):
        try:
            image = read_image(path)
        except ValueError as err:
            report.failed.append((path, str(err)))
            continue
        protocol = protocol_for(
            image.shape[:2], crop=params.crop, flip=params.flip, slide_above=params.slide_above
        )
        pred = label_map(model.module, image, protocol, device)
        stem = path.stem if path.stem not in used else f"{path.parent.name}_{path.stem}"
        used.add(stem)
        targets = {
            "mask": colorize(pred, model.palette),
            "overlay": overlay(image, pred, model.palette),
            "labels": pred,
        }
        for kind, array in targets.items():
            target = out / f"{stem}_{kind}.png"
            _save(array, target)
            report.written.append(target)
        report.images += 1
    return report
