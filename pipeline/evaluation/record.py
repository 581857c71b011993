"""metrics.json of ``danet evaluate``: the typed record the registry reads back."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import ConfigError, DataError


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, path: Path) -> Evaluation:
        """A metrics.json written by ``danet evaluate``; anything else is one DataError."""
        if not path.is_file():
            raise ConfigError(f"{path}: evaluation metrics do not exist (run danet evaluate)")
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            raise DataError(path, f"not metrics written by danet evaluate ({err})") from None
