"""metrics.json of ``danet evaluate``: the typed record the registry reads back."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, DataError

# the files of evaluate.out (dvc.yaml names the same)
REPORT = {
    "metrics": "metrics.json",
    "per_class_iou": "per_class_iou.csv",
    "confusion_matrix": "confusion_matrix.png",
    "predictions": "predictions.png",
}


@dataclass(frozen=True)
class Evaluation:
    """metrics.json of ``evaluate.out``: what was evaluated, on which data, how, and the scores."""

    model: str
    model_uri: str
    dataset: str
    split: str
    split_sha256: str  # the digest of the shards actually evaluated
    protocol: str
    miou: float
    pixel_acc: float
    mean_acc: float
    iou_per_class: dict[str, float]
    images: int

    def mlflow_metrics(self) -> dict[str, float]:
        """The scores as MLflow metrics named by split and protocol (``val/official-whole-flip/
        miou``, ``.../pixel_acc``, ``.../mean_acc``): charted right after the training's
        ``val/miou`` curve (pipeline/training/records.py). The per-class IoUs are a picture
        attached to the registered model (one axis for all), not a chart per class."""
        key = f"{self.split}/{self.protocol}"
        return {
            f"{key}/miou": self.miou,
            f"{key}/pixel_acc": self.pixel_acc,
            f"{key}/mean_acc": self.mean_acc,
        }

    def mlflow_dataset(self) -> tuple[str, str]:
        """The evaluated shards as the training run names them among its datasets (name, digest:
        the first 16 hex digits of ``split_sha256``, the registry's ``data_sha256``)."""
        return f"{self.dataset}-{self.split}", self.split_sha256[:16]

    def to_json(self) -> str:
        """Strict JSON: a class absent from truth and prediction has IoU ``null``, never NaN."""
        data = asdict(self)
        data["iou_per_class"] = {
            k: None if math.isnan(v) else v for k, v in self.iou_per_class.items()
        }
        return json.dumps(data, indent=2, allow_nan=False) + "\n"

    @classmethod
    def read(cls, path: Path) -> Evaluation:
        """A metrics.json written by ``danet evaluate``, its scores numbers; else one DataError."""
        if not path.is_file():
            raise ConfigError(f"{path}: evaluation metrics do not exist (run danet evaluate)")
        try:
            data = json.loads(path.read_text(), parse_constant=_refuse_constant)
            data["iou_per_class"] = {
                k: math.nan if v is None else float(v) for k, v in data["iou_per_class"].items()
            }
            evaluation = cls(**data)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, KeyError) as err:
            raise DataError(path, f"not metrics written by danet evaluate ({err})") from None
        for key in ("miou", "pixel_acc", "mean_acc"):
            value = getattr(evaluation, key)
            if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1):
                raise DataError(path, f"{key} is {value!r}, not a score in [0, 1]: not registered")
        if not (isinstance(evaluation.images, int) and evaluation.images > 0):
            raise DataError(path, f"evaluates {evaluation.images!r} images: not registered")
        return evaluation


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")
