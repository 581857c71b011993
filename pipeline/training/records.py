"""What a training run records: per-step logs, per-evaluation scores, and their names.

Each metric name is defined here once; the worker reports them to Ray and MLflow, the results
writer turns them into CSVs and pictures, the search reads ``VAL_MIOU`` back from Tune.

MLflow's names differ from Ray's: its UI groups a run's charts by the prefix before the last
``/`` and sorts the groups by name, unprefixed metrics last. ``loss/total`` and ``val/miou``
head the first two groups, so the loss and the val mIoU curves are the first a user sees
(then ``val/<protocol>`` from ``danet evaluate``, ``val_iou/<class>``, and lr, throughput).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

VAL_MIOU = "val_miou"
VAL_PIXEL_ACC = "val_pixel_acc"
VAL_MEAN_ACC = "val_mean_acc"
IMAGES_PER_S = "images_per_s"
STEP_IMAGES_PER_S = "step_images_per_s"
LOSS = "loss"
LR = "lr"
LR_HEAD = "lr_head"


@dataclass
class StepRecord:
    """Means over the steps since the last log line."""

    iteration: int
    loss: float
    lr: float  # the base learning rate (the backbone's group): train.lr on the poly schedule
    images_per_s: float  # wall clock, loader included, all workers
    parts: dict[str, float] = field(default_factory=dict)  # unweighted loss per output
    lr_head: float = 0.0  # the head's group: lr x train.head_lr_mult
    skipped_steps: int | None = None  # steps not applied: their gradients were not finite
    grad_norm: float | None = None  # mean total gradient norm of the applied steps
    empty_batches: int | None = None  # micro-batches without a labelled pixel (their loss: 0)
    mfu: float | None = None  # model FLOPs utilization at images_per_s (pipeline/training/flops.py)

    def mlflow_metrics(self) -> dict[str, float]:
        """As MLflow charts them: ``loss/total``, ``loss/output/<pam|cam|out>``, ``lr`` (the
        base lr), ``lr_head``, ``images_per_s``, ``skipped_steps`` (since the last),
        ``grad_norm``, ``empty_batches``, ``mfu``."""
        rates = {LR: self.lr, LR_HEAD: self.lr_head, IMAGES_PER_S: self.images_per_s}
        extra = {
            k: v
            for k, v in (
                ("skipped_steps", self.skipped_steps),
                ("grad_norm", self.grad_norm),
                ("empty_batches", self.empty_batches),
                ("mfu", self.mfu),
            )
            if v is not None
        }
        return {"loss/total": self.loss, **rates, **extra} | {
            f"loss/output/{k}": v for k, v in self.parts.items()
        }


@dataclass
class EvalRecord:
    """One in-training evaluation (whole images of the val split). The scores are
    ``danet.metrics.summarize``'s, named as in ``danet evaluate``'s metrics.json
    (pipeline/evaluation/report.py); reported to Ray and MLflow as ``val_*``."""

    epoch: int
    iteration: int
    miou: float
    pixel_acc: float
    mean_acc: float
    train_loss: float
    iou_per_class: list[float]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalRecord:
        """A record of history.json; a checkpoint written before the scores were renamed
        (``val_miou``...) still resumes."""
        return cls(**{k.removeprefix("val_"): v for k, v in data.items()})

    def metrics(self) -> dict[str, float]:
        """What is reported to Ray Train (and Tune) at an evaluation."""
        return {
            VAL_MIOU: self.miou,
            VAL_PIXEL_ACC: self.pixel_acc,
            VAL_MEAN_ACC: self.mean_acc,
            "epoch": self.epoch,
            "iteration": self.iteration,
            "train_loss": self.train_loss,
        }

    def mlflow_metrics(self) -> dict[str, float]:
        """As MLflow charts them: ``val/miou``, ``val/pixel_acc``, ``val/mean_acc``. The
        per-class IoUs are one picture (``evaluations/per_class_iou_<iteration>.png``, tracker.py),
        one axis for every class, not a chart each."""
        return {
            "val/miou": self.miou,
            "val/pixel_acc": self.pixel_acc,
            "val/mean_acc": self.mean_acc,
        }


@dataclass
class History:
    """Everything a run recorded so far; saved with every checkpoint."""

    steps: list[StepRecord] = field(default_factory=list)
    evals: list[EvalRecord] = field(default_factory=list)

    def best(self) -> EvalRecord:
        return max(self.evals, key=lambda e: e.miou)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> History:
        data: dict[str, Any] = json.loads(text)
        return cls(
            steps=[StepRecord(**s) for s in data.get("steps", [])],
            evals=[EvalRecord.from_dict(e) for e in data.get("evals", [])],
        )
