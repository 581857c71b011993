"""Evaluate a model on a split of the shards: whole image, sliding window, multi-scale + flip.

Reports mIoU, pixel accuracy, mean accuracy and per-class IoU (printed as a table, written as
JSON and CSV), a confusion-matrix PNG and prediction overlays. ``evaluate.model: auto`` takes the
better (by its in-training val mIoU) of the training run's model and the search's best model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from danet.inference import Protocol, infer, to_input
from danet.metrics import ConfusionMatrix, summarize
from pipeline.artifacts.modelfile import read_model_info
from pipeline.artifacts.refs import LoadedModel, load_model
from pipeline.config import ConfigError, EvaluateParams
from pipeline.data.loader import read_shard
from pipeline.data.manifest import ShardRef, load_manifest, shard_refs
from pipeline.outputs import atomic_dir, check_outside
from pipeline.pictures import (
    plot_confusion_matrix,
    prediction_grid,
    save_png,
    write_per_class_iou,
)

CANDIDATES = ("outputs/train/model.pt", "outputs/tune/model.pt")


def protocol_of(params: EvaluateParams) -> Protocol:
    try:
        return Protocol(params.mode, params.crop, params.stride, tuple(params.scales), params.flip)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def pick_device(name: str) -> torch.device:
    """``auto`` = CUDA when present; ``cuda`` without a GPU is an error, not a silent CPU run."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("evaluate.device is cuda but no CUDA device is available")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def pick_model(ref: str, candidates: Sequence[str] = CANDIDATES) -> str:
    """``auto`` -> the candidate model file with the best recorded (in-training) val mIoU."""
    if ref != "auto":
        return ref
    scored = [(read_model_info(c).val_miou, c) for c in candidates if Path(c).is_file()]
    if not scored:
        raise ConfigError(
            f"evaluate.model is auto but none of {', '.join(candidates)} exists (run danet train)"
        )
    return max(scored)[1]


def evaluate_model(
    model: LoadedModel,
    shards: Sequence[ShardRef],
    protocol: Protocol,
    device: torch.device,
    num_overlays: int = 4,
    progress: bool = True,
) -> tuple[ConfusionMatrix, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Confusion matrix over every image of ``shards``, and the first ``num_overlays`` predictions."""
    module = model.module.to(device).eval()
    cm = ConfusionMatrix(len(model.classes), device=device)
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    bar = tqdm(desc=f"evaluate ({protocol.name})", unit="img", disable=None if progress else True)
    with torch.no_grad():
        for ref in shards:
            for _, image, label in read_shard(ref):
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
    check_outside(params.out, {"evaluate.shards": params.shards, "evaluate.model": ref})
    manifest = load_manifest(params.shards)
    shards = shard_refs(manifest, params.split)
    protocol = protocol_of(params)
    device = pick_device(params.device)
    model = load_model(ref, tracking_uri)
    if list(model.classes) != list(manifest.classes):
        raise ConfigError(
            f"{ref}: the model has {len(model.classes)} classes ({', '.join(model.classes[:3])}, ...) but "
            f"{params.shards} has {manifest.num_classes} ({', '.join(manifest.classes[:3])}, ...)"
        )
    cm, rows = evaluate_model(model, shards, protocol, device, params.num_overlays)
    result = summarize(cm.matrix)
    iou = dict(zip(model.classes, result["iou_per_class"], strict=True))
    metrics = {
        "model": ref,
        "model_uri": model.uri,
        "dataset": manifest.dataset,
        "split": params.split,
        "split_sha256": manifest.split_digest(params.split),
        "protocol": protocol.name,
        "miou": result["miou"],
        "pixel_acc": result["pixel_acc"],
        "mean_acc": result["mean_acc"],
        "iou_per_class": iou,
        "images": manifest.split(params.split).samples,
    }
    with atomic_dir(Path(params.out)) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_per_class_iou(tmp / "per_class_iou.csv", iou.items())
        title = f"{manifest.dataset} {params.split} ({protocol.name}): mIoU {result['miou']:.3f}"
        plot_confusion_matrix(
            cm.matrix.cpu().numpy(), model.classes, tmp / "confusion_matrix.png", title
        )
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
