"""Confusion-matrix metrics for semantic segmentation: pixel accuracy, mean accuracy, IoU, mIoU.

As torchvision's references/segmentation: the matrix is updated with ``bincount`` on the device,
all-reduced once when ``torch.distributed`` is initialised, then read by pure functions. Rows are
ground truth, columns predictions; pixels labelled ``ignore_index`` are never counted. A class that
appears neither in the ground truth nor in the predictions has IoU NaN and is left out of the mean.
"""

from __future__ import annotations

from typing import TypedDict

import torch
import torch.distributed as dist


class SegmentationMetrics(TypedDict):
    miou: float
    pixel_acc: float
    mean_acc: float
    iou_per_class: list[float]


class ConfusionMatrix:
    """Accumulates a (K, K) confusion matrix of int64 counts."""

    def __init__(
        self, num_classes: int, ignore_index: int = 255, device: str | torch.device = "cpu"
    ):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` are integer maps of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        k = self.num_classes
        valid = target != self.ignore_index
        t = target[valid].long()
        if t.numel() and (t.min() < 0 or t.max() >= k):
            raise ValueError(f"target has values outside [0, {k}) that are not ignore_index")
        index = k * t + pred[valid].long().to(t.device)
        self.matrix += torch.bincount(index, minlength=k * k).reshape(k, k).to(self.matrix.device)

    def reduce(self) -> None:
        """Sum the matrix over all workers (no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def compute(self) -> SegmentationMetrics:
        """All metrics as Python numbers (per-class IoU as a list)."""
        return summarize(self.matrix)


def pixel_accuracy(cm: torch.Tensor) -> float:
    """Correct pixels over all counted pixels."""
    total = cm.sum()
    return float(cm.diag().sum() / total) if total > 0 else float("nan")


def class_accuracy(cm: torch.Tensor) -> torch.Tensor:
    """Recall per class (NaN for classes absent from the ground truth)."""
    cm = cm.double()
    return cm.diag() / cm.sum(dim=1)


def mean_accuracy(cm: torch.Tensor) -> float:
    return float(class_accuracy(cm).nanmean())


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """TP / (TP + FP + FN) per class (NaN where the class is neither present nor predicted)."""
    cm = cm.double()
    tp = cm.diag()
    return tp / (cm.sum(dim=0) + cm.sum(dim=1) - tp)


def mean_iou(cm: torch.Tensor) -> float:
    return float(iou_per_class(cm).nanmean())


def summarize(cm: torch.Tensor) -> SegmentationMetrics:
    cm = cm.cpu()
    return {
        "miou": mean_iou(cm),
        "pixel_acc": pixel_accuracy(cm),
        "mean_acc": mean_accuracy(cm),
        "iou_per_class": [float(v) for v in iou_per_class(cm)],
    }
