"""Evaluate a model on a split of the shards under a protocol (danet/inference.py).

Reports mIoU, pixel accuracy, mean accuracy and per-class IoU (printed as a table, written as
JSON and CSV), a confusion-matrix PNG and prediction overlays. ``evaluate.model: auto`` takes the
better (by its in-training val mIoU) of the training run's model and the search's best model.

``evaluate.workers`` > 1 spreads the split's shards over that many Ray tasks (a GPU each when
the cluster has them): every image is read and decoded by exactly one task, and the confusion
matrices are summed, so the scores equal a one-process evaluation's. ``evaluate.bf16`` runs the
model under bf16 autocast on CUDA (the attention's energies stay fp32).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from danet.inference import Protocol, check_work
from danet.metrics import summarize
from pipeline.artifacts.modelfile import read_model_info, recorded_run
from pipeline.artifacts.onnxfile import load_any_model
from pipeline.artifacts.refs import LoadedModel
from pipeline.config import ConfigError, Params
from pipeline.data.manifest import Manifest, ShardRef, load_manifest, shard_refs
from pipeline.data.predictions import Row, confusion, prediction_rows, predictions
from pipeline.devices import pick_device
from pipeline.errors import DataError, first_line
from pipeline.evaluation.report import REPORT, Evaluation
from pipeline.images import MAX_PIXELS
from pipeline.modelrefs import WEIGHTS_FILE
from pipeline.outputs import atomic_dir, check_output, check_outside, check_own
from pipeline.pictures import plot_confusion_matrix, prediction_grid, save_png, write_per_class_iou
from pipeline.schema import MAX_CROP, MAX_PASSES, MIN_WORK, WORK_PER_PIXEL
from pipeline.scores import best
from pipeline.sections import EvaluateParams, PredictParams

log = logging.getLogger(__name__)


def protocol_of(params: EvaluateParams | PredictParams, mode: str = "") -> Protocol:
    """The protocol of ``evaluate.*`` or ``predict.*`` (checked there: this cannot fail);
    ``mode`` replaces theirs (predict's ``auto`` is decided per image)."""
    test_scale = params.test_scale
    return Protocol(
        reference=params.reference,
        mode=mode or params.mode,
        crop=params.crop,
        stride=params.stride,
        scales=tuple(params.scales),
        flip=params.flip,
        base_size=params.base_size,
        test_scale=(test_scale[0], test_scale[1]) if len(test_scale) == 2 else None,
        window_batch=params.window_batch,
    )


def pick_model(ref: str, candidates: Sequence[str]) -> str:
    """``auto`` -> the candidate model file whose training run's own validation is best
    (pipeline/scores.py: the first on ties)."""
    if ref != "auto":
        return ref
    there = [c for c in candidates if Path(c).is_file()]
    if not there:
        raise ConfigError(
            f"evaluate.model is auto but none of {', '.join(candidates)} exists (run danet train)"
        )
    found = best(there, lambda c: read_model_info(c).best_val_miou)
    if found is None:
        raise ConfigError(
            f"evaluate.model is auto but {', '.join(there)} record no validation score "
            "(not trained here): name the model with evaluate.model"
        )
    return found


def evaluate_model(
    module: torch.nn.Module,
    num_classes: int,
    shards: Sequence[ShardRef],
    protocol: Protocol,
    device: torch.device,
    *,
    bf16: bool = False,
    num_overlays: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, list[Row]]:
    """The confusion matrix over every image of ``shards``, and the first ``num_overlays``
    (image, truth, prediction) rows (pipeline/data/predictions.py). ``module`` maps RGB in
    [0, 1] to logits."""
    images = predictions(module, shards, device, protocol, precision="bf16" if bf16 else "fp32")
    desc, disable = f"evaluate ({protocol.name})", None if progress else True
    cm, rows = confusion(
        tqdm(images, desc=desc, unit="img", disable=disable), num_classes, device, num_overlays
    )
    return cm.matrix.cpu(), rows


def evaluate_on_ray(
    model: LoadedModel, shards: Sequence[ShardRef], protocol: Protocol, params: EvaluateParams
) -> torch.Tensor:
    """``params.workers`` Ray tasks, each evaluating every ``workers``-th shard; the sum."""
    import ray

    from pipeline.cluster import connect_ray

    connect_ray("")
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(_evaluate_part)
    module = ray.put(model.module.cpu())
    parts = [
        task.remote(module, len(model.classes), shards[i :: params.workers], protocol, params.bf16)
        for i in range(params.workers)
        if shards[i :: params.workers]
    ]
    return torch.stack([torch.from_numpy(m) for m in ray.get(parts)]).sum(0)


def _evaluate_part(
    module: torch.nn.Module,
    num_classes: int,
    shards: Sequence[ShardRef],
    protocol: Protocol,
    bf16: bool,
) -> np.ndarray:
    device = pick_device()
    matrix, _ = evaluate_model(
        module, num_classes, shards, protocol, device, bf16=bf16, progress=False
    )
    return matrix.numpy()


def run_evaluation(
    params: EvaluateParams, tracking_uri: str = "", choices: Sequence[str] | None = None
) -> Evaluation:
    """Evaluate, write the report folder atomically, return metrics.json's content.

    ``choices`` are the model files ``evaluate.model: auto`` chooses from (default: those of
    the default params, ``candidates``).
    """
    ref = pick_model(params.model, candidates(Params()) if choices is None else choices)
    check_output(params.out, "evaluate.out")
    check_own(params.out, "evaluate.out", "evaluate", tuple(REPORT.values()))
    check_outside(params.out, {"evaluate.shards": params.shards, "evaluate.model": ref})
    manifest = load_manifest(params.shards)
    manifest.labelled_split(params.split, "evaluate.split")
    shards = shard_refs(manifest, params.split)
    protocol = protocol_of(params)
    check_fits(manifest, params.split, protocol)
    device = pick_device(params.device, "evaluate.device")
    model = load_any_model(ref, tracking_uri, device)
    if list(model.classes) != list(manifest.classes):
        raise ConfigError(
            f"{ref}: the model has {len(model.classes)} classes ({', '.join(model.classes[:3])}, ...) but "
            f"{params.shards} has {manifest.num_classes} ({', '.join(manifest.classes[:3])}, ...)"
        )
    num_classes = len(model.classes)
    if params.workers > 1:
        matrix = evaluate_on_ray(model, shards, protocol, params)
        rows = prediction_rows(
            model.module.to(device).eval(), shards, params.num_overlays, device, protocol
        )
    else:
        matrix, rows = evaluate_model(
            model.module,
            num_classes,
            shards,
            protocol,
            device,
            bf16=params.bf16,
            num_overlays=params.num_overlays,
        )
    check_counted(matrix, manifest, params.split)
    result = summarize(matrix)
    evaluation = Evaluation(
        model=ref,
        model_uri=model.uri,
        dataset=manifest.dataset,
        split=params.split,
        split_sha256=manifest.split_digest(params.split),
        protocol=protocol.name,
        miou=result["miou"],
        pixel_acc=result["pixel_acc"],
        mean_acc=result["mean_acc"],
        iou_per_class=dict(zip(model.classes, result["iou_per_class"], strict=True)),
        images=manifest.split(params.split).samples,
    )
    write_report(Path(params.out), evaluation, matrix, rows, model)
    if tracking_uri:
        log_to_model(evaluation, model.uri, tracking_uri)
    return evaluation


def check_fits(manifest: Manifest, split: str, protocol: Protocol) -> None:
    """The split's largest image (the manifest's) at every scale and in every forward pass of
    ``protocol`` within the limits (danet/inference.py ``check_work``), before any work."""
    width, height = manifest.split(split).max_size
    if not width or not height:  # no images: refused as such once the shards are read
        return
    try:
        budget = max(WORK_PER_PIXEL * height * width, MIN_WORK)
        check_work(height, width, protocol, MAX_CROP**2, MAX_PIXELS, budget, MAX_PASSES)
    except ValueError as err:
        raise ConfigError(f"evaluate: the largest image of split {split!r}, {err}") from None


def check_counted(matrix: torch.Tensor, manifest: Manifest, split: str) -> None:
    """The labelled pixels evaluated are those the manifest counted when sharding (each shard's
    images are counted as read, pipeline/data/loader.py): no split is scored on no data."""
    info = manifest.split(split)
    where = f"{manifest.location}/manifest.json"
    if info.samples == 0 or not info.shards:
        raise DataError(where, f"split {split!r} has no images: nothing to evaluate")
    counted, expected = int(matrix.sum()), sum(info.class_pixels)
    if counted != expected:
        raise DataError(
            where,
            f"split {split!r}: {counted} labelled pixels were evaluated, the manifest counts "
            f"{expected}: the shards do not match it (re-run danet shard)",
        )
    if expected == 0:
        raise DataError(where, f"split {split!r} has no labelled pixel: mIoU is undefined")


def log_to_model(evaluation: Evaluation, ref: str, tracking_uri: str) -> None:
    """The scores on the evaluated model's MLflow run and logged model, named by split and
    protocol (``val/official-whole-flip/miou``, ``val/official-whole-flip/iou/Road``)."""
    from pipeline.mlflowstore import log_scores

    try:
        metrics, dataset = evaluation.mlflow_metrics(), evaluation.mlflow_dataset()
        if not log_scores(tracking_uri, ref, metrics, dataset, recorded_run(ref)):
            log.info("%s has no MLflow run: the scores are in metrics.json only", ref)
    except Exception as err:  # MLflow down: the report is written all the same
        log.warning("MLflow unreachable (%s): the scores are in metrics.json only", first_line(err))


def candidates(p: Params) -> list[str]:
    """The model files ``evaluate.model: auto`` chooses from: train.out's and tune.out's."""
    return [str(Path(p.train.out) / WEIGHTS_FILE), str(Path(p.tune.out) / WEIGHTS_FILE)]


def write_report(
    out: Path, evaluation: Evaluation, matrix: torch.Tensor, rows: list[Row], model: LoadedModel
) -> None:
    with atomic_dir(out) as tmp:
        (tmp / REPORT["metrics"]).write_text(evaluation.to_json())
        write_per_class_iou(tmp / REPORT["per_class_iou"], evaluation.iou_per_class.items())
        title = f"{evaluation.dataset} {evaluation.split} ({evaluation.protocol}): mIoU {evaluation.miou:.3f}"
        plot_confusion_matrix(
            matrix.numpy(), model.classes, tmp / REPORT["confusion_matrix"], title
        )
        if rows:
            save_png(prediction_grid(rows, model.palette), tmp / REPORT["predictions"])


def describe(evaluation: Evaluation, out: str) -> str:
    """What ``danet evaluate`` prints: the per-class table, then one line."""
    return (
        f"{format_table(evaluation)}\n{evaluation.model} on {evaluation.dataset} "
        f"{evaluation.split} ({evaluation.protocol}): mIoU {evaluation.miou:.4f} -> {out}/"
    )


def format_table(evaluation: Evaluation) -> str:
    lines = [f"{'class':<20} {'IoU':>7}"]
    for name, iou in evaluation.iou_per_class.items():
        lines.append(f"{name:<20} {'n/a' if np.isnan(iou) else f'{iou:7.4f}':>7}")
    lines.append(f"{'mIoU':<20} {evaluation.miou:7.4f}")
    lines.append(f"{'pixel accuracy':<20} {evaluation.pixel_acc:7.4f}")
    lines.append(f"{'mean accuracy':<20} {evaluation.mean_acc:7.4f}")
    return "\n".join(lines)
