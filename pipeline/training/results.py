"""A finished run's outputs: the DVC folder (model.pt, metrics, curves, pictures) and MLflow's.

``write_outputs`` builds ``train.out`` atomically from the best and latest checkpoints;
``log_outputs`` puts the same pictures, tables and the model into the run's MLflow run.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from danet.inference import Protocol
from pipeline.artifacts.modelfile import ModelInfo, load_model_file, save_model_file
from pipeline.data.predictions import prediction_rows
from pipeline.modelrefs import WEIGHTS_FILE
from pipeline.notes import NOTE_TAG, TrainingNote
from pipeline.outputs import atomic_dir
from pipeline.pictures import (
    plot_confusion_matrix,
    plot_curves,
    plot_per_class_iou,
    prediction_grid,
    save_png,
    write_per_class_iou,
)
from pipeline.scores import TRAINING_SCORE
from pipeline.sections import MlflowParams
from pipeline.training.checkpoint import TrainState
from pipeline.training.job import TrainJob, code_digest, device_of
from pipeline.training.records import VAL_MIOU, EvalRecord, History

OUTPUT_FILES = (  # the pictures first: the run's description lists them in this order
    "val_predictions.png",
    "per_class_iou.png",
    "confusion_matrix.png",
    "curves.png",
    "per_class_iou.csv",
    "metrics.json",
    "train_curve.csv",
    "val_curve.csv",
)


@dataclass(frozen=True)
class RunSummary:
    """metrics.json of ``train.out``."""

    best: dict[str, float]
    final: dict[str, float]
    run_name: str
    mlflow_run_id: str
    dataset: str

    def describe(self) -> str:
        """What ``danet train`` prints."""
        return (
            f"run {self.run_name}: best val mIoU {self.best[VAL_MIOU]:.4f} at iteration "
            f"{self.best['iteration']:.0f}, final {self.final[VAL_MIOU]:.4f}"
        )


def _scores(e: EvalRecord) -> dict[str, float]:
    """An evaluation as metrics.json holds it: the names it is reported under (``val_miou``)."""
    return {k: v for k, v in e.metrics().items() if k != "train_loss"}


def write_curves(directory: Path, history: History) -> None:
    with open(directory / "train_curve.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", "loss", "lr", "images_per_s"])
        for s in history.steps:
            writer.writerow([s.iteration, f"{s.loss:.5f}", f"{s.lr:.6g}", f"{s.images_per_s:.2f}"])
    with open(directory / "val_curve.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", "miou", "pixel_acc", "mean_acc"])
        for e in history.evals:
            writer.writerow(
                [
                    e.iteration,
                    f"{e.miou:.5f}",
                    f"{e.pixel_acc:.5f}",
                    f"{e.mean_acc:.5f}",
                ]
            )


def model_info(job: TrainJob, best: EvalRecord, run_id: str) -> ModelInfo:
    return ModelInfo(
        config=job.model.to_danet_config(job.num_classes),
        classes=job.classes,
        palette=job.palette,
        mean=job.mean,
        std=job.std,
        dataset=job.dataset,
        meta={
            VAL_MIOU: best.miou,
            "iteration": best.iteration,
            "mlflow_run_id": run_id,
            "lr": job.train.lr,
            "crop_size": job.data.crop_size,
            "manifest_sha256": job.manifest_sha256,
            "code_sha256": code_digest(),
        },
    )


def write_outputs(
    out: Path,
    job: TrainJob,
    run_name: str,
    history: History,
    state: TrainState,
    num_images: int,
) -> RunSummary:
    """model.pt (best weights), metrics.json, curves CSVs and pictures; the folder is replaced
    atomically. Returns metrics.json's content."""
    best, final = history.best(), history.evals[-1]
    if state.best_model is None:
        raise RuntimeError(f"run {run_name}: the checkpoint holds no evaluated weights")
    summary = RunSummary(_scores(best), _scores(final), run_name, job.mlflow_run_id, job.dataset)
    with atomic_dir(out) as tmp:
        save_model_file(
            tmp / WEIGHTS_FILE, state.best_model, model_info(job, best, job.mlflow_run_id)
        )
        (tmp / "metrics.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
        write_curves(tmp, history)
        per_class = list(zip(job.classes, best.iou_per_class, strict=True))
        write_per_class_iou(tmp / "per_class_iou.csv", per_class)
        plot_per_class_iou(
            per_class,
            tmp / "per_class_iou.png",
            f"{job.dataset} val, best checkpoint (iteration {best.iteration}): per-class IoU",
        )
        plot_curves(history.steps, history.evals, tmp / "curves.png", f"{run_name} ({job.dataset})")
        segmenter, _ = load_model_file(tmp / WEIGHTS_FILE)  # also checks the file just written
        rows = prediction_rows(segmenter.eval(), job.val_shards, num_images)
        if rows:
            save_png(prediction_grid(rows, job.palette), tmp / "val_predictions.png")
        if state.best_confusion is not None:
            title = f"{job.dataset} val, best checkpoint (iteration {best.iteration}), mIoU {best.miou:.3f}"
            plot_confusion_matrix(
                state.best_confusion.numpy(), job.classes, tmp / "confusion_matrix.png", title
            )
    return summary


def log_outputs(job: TrainJob, out: Path, summary: RunSummary, tracking: MlflowParams) -> None:
    """The artifacts of ``out``, the weights (``model.pt``) and the summary metrics into the run,
    its description (pipeline/notes.py) and the links between a refit and its search; marks it
    FINISHED. The served pyfunc is built from that file when it is registered."""
    import mlflow

    from pipeline.mlflowstore import link_refit, tracking_uri

    best = summary.best
    with tracking_uri(job.tracking_uri), mlflow.start_run(run_id=job.mlflow_run_id) as run:
        mlflow.log_metrics({TRAINING_SCORE: best[VAL_MIOU], "best_iteration": best["iteration"]})
        logged = [name for name in OUTPUT_FILES if (out / name).exists()]
        for name in logged:
            mlflow.log_artifact(str(out / name))
        if tracking.log_model:  # the weights only: loading them runs no code (weights_only)
            mlflow.log_artifact(str(out / WEIGHTS_FILE))
        # the run's own validation (pipeline/scores.py), by the whole-image protocol; the
        # evaluate stage's score is eval_miou, under its eval_protocol, on the registry's version
        tags = {TRAINING_SCORE: f"{best[VAL_MIOU]:.4f}", "val_protocol": Protocol().name}
        pictures = [name for name in logged if name.endswith(".png")]
        note = training_note(
            job, summary, run.info.experiment_id, {**run.data.tags, **tags}, pictures
        )
        mlflow.set_tags({**tags, NOTE_TAG: note.markdown()})
        link_refit(job.mlflow_run_id, run.data.tags)


def training_note(
    job: TrainJob, summary: RunSummary, experiment_id: str, tags: dict[str, str], files: list[str]
) -> TrainingNote:
    """The run's description: its score and protocol, data, origin, device and pictures."""
    return TrainingNote(
        run_id=job.mlflow_run_id,
        experiment_id=experiment_id,
        dataset=job.dataset,
        backbone=job.model.backbone,
        best_val_miou=summary.best[VAL_MIOU],
        best_iteration=int(summary.best["iteration"]),
        iterations=int(summary.final["iteration"]),
        val_protocol=tags["val_protocol"],
        data=job.split_sha256,
        device=device_of(job.train),
        tags=tags,
        files=files,
    )
