"""Evaluate a model on a split of the shards: whole image, sliding window, multi-scale + flip.

Reports mIoU, pixel accuracy, mean accuracy and per-class IoU (printed as a table, written as
JSON and CSV), a confusion-matrix PNG and prediction overlays. ``evaluate.model: auto`` takes the
better (by its in-training val mIoU) of the training run's model and the search's best model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from danet.metrics import ConfusionMatrix, summarize
from pipeline.atomic import atomic_dir
from pipeline.config import ConfigError, _check
from pipeline.data import read_shard
from pipeline.inference import Protocol, infer, to_input
from pipeline.modelref import LoadedModel, load_model
from pipeline.shard import load_manifest, shard_urls
from pipeline.visualize import (
    plot_confusion_matrix,
    prediction_grid,
    save_png,
    write_per_class_iou,
)

CANDIDATES = ("outputs/train/model.pt", "outputs/tune/model.pt")


@dataclass(frozen=True)
class EvaluateParams:
    model: str = "auto"
    shards: str = "data/shards"
    split: str = "val"
    mode: str = "whole"
    crop: int = 512
    stride: int = 0
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    out: str = "outputs/eval"
    num_overlays: int = 4
    device: str = "auto"

    def __post_init__(self) -> None:
        _check(self.num_overlays >= 0, "evaluate.num_overlays must be >= 0")
        _check(
            self.device in ("auto", "cpu", "cuda"),
            f"evaluate.device must be auto, cpu or cuda, got {self.device!r}",
        )

    def protocol(self) -> Protocol:
        try:
            return Protocol(self.mode, self.crop, self.stride, tuple(self.scales), self.flip)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def pick_model(ref: str, candidates: Sequence[str] = CANDIDATES) -> str:
    """``auto`` -> the candidate model file with the best recorded (in-training) val mIoU."""
    if ref != "auto":
        return ref
    scored = []
    for candidate in candidates:
        if Path(candidate).is_file():
            payload = torch.load(candidate, map_location="cpu", weights_only=True)
            scored.append((float(payload.get("val_miou", 0.0)), candidate))
    if not scored:
        raise ConfigError(
            f"evaluate.model is auto but none of {', '.join(candidates)} exists (run danet train)"
        )
    return max(scored)[1]


def evaluate_model(
    model: LoadedModel,
    urls: list[str],
    protocol: Protocol,
    device: torch.device,
    num_overlays: int = 4,
    progress: bool = True,
) -> tuple[ConfusionMatrix, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Confusion matrix over every image of ``urls``, and the first ``num_overlays`` predictions."""
    module = model.module.to(device).eval()
    cm = ConfusionMatrix(len(model.classes), device=device)
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    bar = tqdm(desc=f"evaluate ({protocol.name})", unit="img", disable=None if progress else True)
    with torch.no_grad():
        for url in urls:
            for _, image, label in read_shard(url):
                logits = infer(module, to_input(image).to(device), protocol)
                pred = logits.argmax(1)[0]
                cm.update(pred, torch.from_numpy(label).to(device).long())
                if len(rows) < num_overlays:
                    rows.append((image, label, pred.cpu().numpy().astype(np.uint8)))
                bar.update()
    bar.close()
    cm.reduce()
    return cm, rows


def run_evaluation(
    params: EvaluateParams, tracking_uri: str = "", candidates: Sequence[str] = CANDIDATES
) -> dict[str, Any]:
    """Evaluate, write the report folder atomically, return metrics.json's content.

    ``candidates`` are the model files ``evaluate.model: auto`` chooses from (train.out, tune.out).
    """
    ref = pick_model(params.model, candidates)
    manifest = load_manifest(params.shards)
    urls = shard_urls(params.shards, manifest, params.split)
    protocol = params.protocol()
    model = load_model(ref, tracking_uri)
    if list(model.classes) != list(manifest["classes"]):
        raise ConfigError(
            f"{ref}: the model has {len(model.classes)} classes ({', '.join(model.classes[:3])}, ...) but "
            f"{params.shards} has {len(manifest['classes'])} ({', '.join(manifest['classes'][:3])}, ...)"
        )
    device = torch.device("cuda" if params.device != "cpu" and torch.cuda.is_available() else "cpu")
    cm, rows = evaluate_model(model, urls, protocol, device, params.num_overlays)
    result = summarize(cm.matrix)
    metrics = {
        "model": ref,
        "model_uri": model.uri,
        "dataset": manifest["dataset"],
        "split": params.split,
        "protocol": protocol.name,
        "miou": result["miou"],
        "pixel_acc": result["pixel_acc"],
        "mean_acc": result["mean_acc"],
        "iou_per_class": dict(zip(model.classes, result["iou_per_class"], strict=True)),
        "images": int(sum(s["samples"] for s in manifest["splits"][params.split]["shards"])),
    }
    with atomic_dir(Path(params.out)) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_per_class_iou(tmp / "per_class_iou.csv", metrics["iou_per_class"].items())
        plot_confusion_matrix(cm.matrix.cpu().numpy(), model.classes, tmp / "confusion_matrix.png",
                              f"{manifest['dataset']} {params.split} ({protocol.name}): mIoU {result['miou']:.3f}")  # fmt: skip
        if rows:
            save_png(prediction_grid(rows, model.palette), tmp / "predictions.png")
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    lines = [f"{'class':<20} {'IoU':>7}"]
    for name, iou in metrics["iou_per_class"].items():
        lines.append(f"{name:<20} {'n/a' if np.isnan(iou) else f'{iou:7.4f}':>7}")
    lines.append(f"{'mIoU':<20} {metrics['miou']:7.4f}")
    lines.append(f"{'pixel accuracy':<20} {metrics['pixel_acc']:7.4f}")
    lines.append(f"{'mean accuracy':<20} {metrics['mean_acc']:7.4f}")
    return "\n".join(lines)
