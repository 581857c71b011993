"""A model reference, parsed once: what every ``--model``, ``model.init_from``, ``evaluate.model``
and registered ONNX file may name, as one typed value.

- ``file``: a ``model.pt`` written by training (or ``danet import-weights``);
- ``onnx``: a file written by ``danet export``;
- ``run``: an MLflow run id (its served model once registered, else the weights it logged);
- ``runs``: ``runs:/<run_id>/<artifact>`` (``runs:/<id>/model.pt``: the run's weights);
- ``models``: a logged model ``models:/m-...`` or a registry URI ``models:/NAME@alias`` /
  ``models:/NAME/3``.

Anything else is ``unknown``: loading it is one line naming what a reference may be. Parsing
looks at the text (and, for a bare name, whether such a file exists); it never contacts MLflow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

WEIGHTS_FILE = "model.pt"  # training's weights: train.out's file, a run's artifact, the pyfunc's
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
Kind = Literal["file", "onnx", "run", "runs", "models", "unknown"]
EXPECTED = "a model file, MLflow run id, runs:/ or models:/ URI"


@dataclass(frozen=True)
class ModelRef:
    text: str
    kind: Kind
    run_id: str = ""  # run, runs
    artifact: str = ""  # runs: the path inside the run

    @property
    def in_mlflow(self) -> bool:
        return self.kind in ("run", "runs", "models")

    @property
    def is_run_weights(self) -> bool:
        """``runs:/<id>/model.pt``: a training run's weights, a plain file (no code)."""
        return self.kind == "runs" and self.artifact == WEIGHTS_FILE

    @property
    def path(self) -> Path:
        return Path(self.text)

    @property
    def model_name(self) -> str:
        """models: what follows ``models:/`` (a logged model's id ``m-...``, ``NAME@alias``)."""
        return self.text.removeprefix(MODELS) if self.kind == "models" else ""


MODELS, RUNS = "models:/", "runs:/"


def registry_uri(name: str, alias: str) -> str:
    """``models:/NAME@alias``: a registered model's version by its alias."""
    return f"{MODELS}{name}@{alias}"


def registry_version_uri(name: str, version: str) -> str:
    """``models:/NAME/VERSION``: one version of a registered model."""
    return f"{MODELS}{name}/{version}"


def run_artifact_uri(run_id: str, artifact: str = WEIGHTS_FILE) -> str:
    """``runs:/<id>/<artifact>`` (default: the run's weights)."""
    return f"{RUNS}{run_id}/{artifact}"


def parse_model_ref(text: str) -> ModelRef:
    """``text`` as a :class:`ModelRef` (see the module docstring)."""
    if text.startswith(MODELS):
        return ModelRef(text, "models")
    if text.startswith(RUNS):
        run_id, _, artifact = text.removeprefix(RUNS).partition("/")
        return ModelRef(text, "runs", run_id, artifact)
    path = Path(text)
    if path.suffix == ".onnx":
        return ModelRef(text, "onnx")
    if path.suffix in (".pt", ".pth") or (text and path.exists()):
        return ModelRef(text, "file")
    if RUN_ID.match(text):
        return ModelRef(text, "run", text)
    return ModelRef(text, "unknown")
