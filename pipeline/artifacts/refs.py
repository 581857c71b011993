"""Resolve a model reference to an inference module and its class table.

A reference is a ``model.pt`` file written by training, an MLflow run id (its served model once
registered, else the weights it logged), ``runs:/<run_id>/model.pt`` (those weights),
``runs:/<run_id>/model``, a logged-model URI ``models:/m-...``, or a registry URI such as
``models:/danet-synthetic@champion`` or ``models:/danet-synthetic/3``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.artifacts.modelfile import load_model_file, palette_of
from pipeline.artifacts.tracking import (
    WEIGHTS_ARTIFACT,
    logged_model_uri,
    resolve_tracking_uri,
    run_weights,
    weights_run,
)
from pipeline.artifacts.tracking import tracking_uri as using
from pipeline.errors import ModelError, first_line

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


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
    path = Path(ref)
    if not ref.startswith(("models:/", "runs:/")) and (
        path.suffix in (".pt", ".pth") or path.exists()
    ):
        module, info = load_model_file(path)
        return LoadedModel(module, info.classes, info.palette, info.dataset, ref, str(path), path)
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = ref
    try:
        with using(resolve_tracking_uri(tracking_uri or DEFAULT_TRACKING_URI)):
            run_id = ref if RUN_ID.match(ref) else weights_run(ref)
            found = logged_model_uri(run_id) if RUN_ID.match(ref) else None
            if run_id and found is None:  # a training run: its weights (a file, no code)
                weights = run_weights(run_id)
                if weights is None:
                    raise ModelError(ref, "no MLflow run with this id holds a model")
                module, info = load_model_file(weights)
                uri = f"runs:/{run_id}/{WEIGHTS_ARTIFACT}"
                return LoadedModel(
                    module, info.classes, info.palette, info.dataset, ref, uri, Path(weights)
                )
            if found is not None:
                uri = found
            elif not ref.startswith(("models:/", "runs:/")):
                raise ModelError(ref, "not a model file, MLflow run id, runs:/ or models:/ URI")
            logged = mlflow.models.get_model_info(uri)  # the MLmodel file: YAML, no code
            meta: dict[str, Any] = logged.metadata or {}
            flavors = set(logged.flavors)
            if "classes" not in meta or flavors != {"python_function"}:
                raise ModelError(ref, "not a model logged by danet train: refused (no code is run)")
            # the served pyfunc carries model.pt, read with weights_only: nothing is unpickled
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as err:
        raise ModelError(ref, f"cannot load the model ({first_line(err)})") from None
    weights = local / "artifacts" / "model.pt"
    if not weights.is_file():
        raise ModelError(
            ref, "the logged model has no artifacts/model.pt (not logged by danet train)"
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
