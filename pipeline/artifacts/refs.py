"""Resolve a model reference (pipeline/modelrefs.py: a ``model.pt``, a run id, ``runs:/``,
``models:/``) to an inference module and its class table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.artifacts.modelfile import load_model_file, palette_of
from pipeline.errors import ModelError, first_line
from pipeline.mlflowstore import logged_model_uri, resolve_tracking_uri, run_weights
from pipeline.mlflowstore import tracking_uri as using
from pipeline.modelrefs import EXPECTED, WEIGHTS_FILE, parse_model_ref, run_artifact_uri

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


@dataclass(frozen=True)
class LoadedModel:
    module: nn.Module  # RGB in [0, 1] -> logits, eval mode
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    dataset: str
    ref: str
    uri: str  # where it came from, normalised (file path or MLflow model URI)
    weights: Path | None = None  # the local model.pt (or .onnx) the module was built from


def load_model(ref: str, tracking_uri: str = "") -> LoadedModel:
    """Load ``ref``; a missing file, unknown run or registry entry, or corrupt file is one line.
    (``.onnx`` files: ``pipeline.artifacts.onnxfile.load_any_model``.)"""
    parsed = parse_model_ref(ref)
    if parsed.kind == "file":
        module, info = load_model_file(parsed.path)
        path = parsed.path
        return LoadedModel(module, info.classes, info.palette, info.dataset, ref, str(path), path)
    if not parsed.in_mlflow:
        raise ModelError(ref, f"not {EXPECTED}")
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = ref
    try:
        with using(resolve_tracking_uri(tracking_uri or DEFAULT_TRACKING_URI)):
            found = logged_model_uri(parsed.run_id) if parsed.kind == "run" else None
            if parsed.is_run_weights or (parsed.kind == "run" and found is None):
                weights = run_weights(parsed.run_id)  # a training run's: a file, no code
                if weights is None:
                    raise ModelError(ref, "no MLflow run with this id holds a model")
                module, info = load_model_file(weights)
                uri = run_artifact_uri(parsed.run_id)
                return LoadedModel(
                    module, info.classes, info.palette, info.dataset, ref, uri, Path(weights)
                )
            if found is not None:
                uri = found
            logged = mlflow.models.get_model_info(uri)  # the MLmodel file: YAML, no code
            meta: dict[str, Any] = logged.metadata or {}
            flavors = set(logged.flavors)
            if "classes" not in meta or flavors != {"python_function"}:
                raise ModelError(ref, "not a model logged by danet train: refused (no code is run)")
            # the served pyfunc carries model.pt, read with weights_only: nothing is unpickled
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as err:
        raise ModelError(ref, f"cannot load the model ({first_line(err)})") from None
    weights = local / "artifacts" / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(
            ref, f"the logged model has no artifacts/{WEIGHTS_FILE} (not logged by danet train)"
        )
    module, info = load_model_file(weights)
    if list(info.classes) != list(meta["classes"]):
        raise ModelError(ref, "the logged model's class metadata differs from its model.pt")
    return LoadedModel(
        module,
        info.classes,
        palette_of(meta["palette"]),
        meta.get("dataset", ""),
        ref,
        uri,
        weights,
    )
