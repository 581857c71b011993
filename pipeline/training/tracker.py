"""Rank 0's reporting during training: progress lines, MLflow metrics that survive the server
going down, prediction overlays per evaluation, the attention pictures of ``danet explain`` at
the last one, and MLflow's system-metrics monitor."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from danet.model import SegmentationModel, Segmenter
from pipeline.errors import first_line
from pipeline.training.flops import Utilization, utilization
from pipeline.training.job import TrainJob
from pipeline.training.records import EvalRecord, History, StepRecord
from pipeline.training.recovery import RecoveryEvent

log = logging.getLogger(__name__)
EVALUATIONS = "evaluations"  # the run's artifact folder of the pictures of every evaluation


class Tracker:
    """Rank 0's progress lines and MLflow metrics: per logged step, per evaluation.

    MLflow going down does not stop training: the metrics wait in a buffer, a warning says so,
    and they are sent when the server answers again (tried at most every ``RETRY_S`` seconds).
    """

    RETRY_S = 30.0

    def __init__(self, job: TrainJob, history: History) -> None:
        self.job, self.history = job, history
        self.client: Any = None
        self.buffer: list[Any] = []
        self.down_since: float | None = None
        self.utilization: Utilization | None = None  # the step's FLOPs and the device's peak
        if job.tracking_uri and job.mlflow_run_id:
            from mlflow.tracking import MlflowClient

            # a server that stops answering must not stall the step for minutes of retries
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            self.client = MlflowClient(job.tracking_uri)

    def _log(self, step: int, values: dict[str, float]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in values.items() if np.isfinite(v)]
        if self.down_since is not None and time.monotonic() - self.down_since < self.RETRY_S:
            return
        try:
            while self.buffer:  # what was sent leaves the buffer: a retry sends only the rest
                self.client.log_batch(self.job.mlflow_run_id, metrics=self.buffer[:1000])
                del self.buffer[:1000]
        except Exception as err:  # the server, its database or the network: keep training
            if self.down_since is None:
                log.warning(
                    "[train] MLflow unreachable (%s): metrics are kept and sent when it answers",
                    first_line(err),
                )
            self.down_since = time.monotonic()
            return
        if self.down_since is not None:
            log.info("[train] MLflow answers again: the buffered metrics are sent")
        self.down_since = None

    def count_flops(self, core: SegmentationModel, device: torch.device, world: int) -> None:
        """Count one micro-batch's FLOPs (once) and find the device's peak: MFU from then on."""
        if self.utilization is not None:
            return
        t = self.job.train
        self.utilization = utilization(
            core,
            images=t.worker_batch,
            crop=self.job.data.crop_size,
            device=device,
            precision=t.precision,
            channels_last=t.channels_last,
            devices=world,
        )
        peak = self.utilization.peak
        log.info(
            "[train] %.3g GFLOP per image and step (forward + backward); peak %s",
            self.utilization.flops_per_image / 1e9,
            f"{peak / 1e12:.3g} TFLOP/s per device" if peak else "unknown (no MFU)",
        )

    def step(self, record: StepRecord) -> None:
        if self.utilization is not None:
            record.mfu = self.utilization.mfu(record.images_per_s)
        self.history.steps.append(record)
        self._log(record.iteration, record.mlflow_metrics())
        total = self.job.train.max_iters
        skipped = (
            f" ({record.skipped_steps} steps skipped: non-finite gradients)"
            if record.skipped_steps
            else ""
        )
        mfu = f" MFU {record.mfu:.1%}" if record.mfu is not None else ""
        log.info(
            "[train] iter %d/%d (%.0f%%) loss %.4f lr %.4g %.1f img/s%s%s",
            record.iteration,
            total,
            100 * record.iteration / total,
            record.loss,
            record.lr,
            record.images_per_s,
            mfu,
            skipped,
        )

    def recovery(self, event: RecoveryEvent) -> None:
        """A bad log window the run went back from: a progress line and MLflow metrics."""
        v = event.verdict
        self._log(v.iteration, {"recoveries": event.count, "recovery/lr": event.lr})
        log.warning(
            "[train] recovery %d/%d at iter %d: %s (%s); back to iter %d, lr x%g -> %.4g",
            event.count,
            self.job.train.max_recoveries,
            v.iteration,
            v.reason,
            v.evidence(),
            event.back_to,
            self.job.train.recover_lr_factor,
            event.lr,
        )

    def _picture(self, array: np.ndarray, name: str, folder: str = "") -> None:
        """``array`` as the run's artifact ``folder/name`` (a PNG that opens in one click under
        *Artifacts*). Not ``log_image``: MLflow's image card puts every param of the run (80 of
        them here) above the picture, and opens on step 0, before any evaluation."""
        import tempfile

        from pipeline.pictures import save_png

        with tempfile.TemporaryDirectory() as tmp:
            path = save_png(array, Path(tmp) / name)
            self.client.log_artifact(self.job.mlflow_run_id, str(path), folder or None)

    def overlays(self, core: SegmentationModel, device: torch.device, iteration: int) -> None:
        """image | truth | prediction rows of the first val images at this iteration:
        ``evaluations/val_predictions_<iteration>.png`` (0: the untrained model)."""
        if self.client is None or not self.job.prediction_images or self.down_since is not None:
            return
        from pipeline.data.predictions import prediction_rows
        from pipeline.pictures import prediction_grid

        segmenter = Segmenter(core, self.job.mean, self.job.std).to(device).eval()
        rows = prediction_rows(segmenter, self.job.val_shards, self.job.prediction_images, device)
        try:
            grid = prediction_grid(rows, self.job.palette)  # as train.out's val_predictions.png
            self._picture(grid, f"val_predictions_{iteration:06d}.png", EVALUATIONS)
        except Exception as err:  # MLflow down: the pictures are not worth stopping for
            log.warning("[train] MLflow: overlays not logged (%s)", first_line(err))

    def attention(self, core: SegmentationModel, device: torch.device, iteration: int) -> None:
        """``danet explain``'s two pictures of the first val image (its largest predicted
        regions as queries): ``val_attention_pam.png`` and ``val_attention_cam.png``."""
        from danet.explain import explain
        from danet.head import DANetHead
        from danet.inference import to_input

        if self.client is None or self.down_since is not None:
            return
        if not self.job.prediction_images or not isinstance(core.head, DANetHead):
            return  # no pictures asked for, or an FCN: no attention to draw
        from pipeline.data.loader import read_shard
        from pipeline.pictures import ATTENTION_FIGURES, figure_array

        segmenter = Segmenter(core, self.job.mean, self.job.std).to(device).eval()
        _, image, _ = next(read_shard(self.job.val_shards[0]))
        x = to_input(image, device)
        try:
            explanation = explain(segmenter, x)
            for kind, figure in ATTENTION_FIGURES.items():
                picture = figure_array(figure(image, explanation, self.job.classes))
                self._picture(picture, f"val_attention_{kind}.png")
        except Exception as err:  # MLflow down: the pictures are not worth stopping for
            log.warning("[train] MLflow: attention pictures not logged (%s)", first_line(err))

    def per_class(self, record: EvalRecord) -> None:
        """Every class's IoU at this evaluation as one bar chart on one axis:
        ``evaluations/per_class_iou_<iteration>.png``."""
        if self.client is None or self.down_since is not None:
            return
        from pipeline.pictures import figure_array, per_class_iou_figure

        pairs = list(zip(self.job.classes, record.iou_per_class, strict=True))
        title = f"{self.job.dataset} val, iteration {record.iteration}: per-class IoU"
        try:
            picture = figure_array(per_class_iou_figure(pairs, title))
            self._picture(picture, f"per_class_iou_{record.iteration:06d}.png", EVALUATIONS)
        except Exception as err:  # MLflow down: the pictures are not worth stopping for
            log.warning("[train] MLflow: per-class IoU not logged (%s)", first_line(err))

    def evaluation(self, record: EvalRecord) -> None:
        self._log(record.iteration, record.mlflow_metrics())
        self.per_class(record)
        log.info(
            "[train] iter %d: val mIoU %.4f pixel acc %.4f",
            record.iteration,
            record.miou,
            record.pixel_acc,
        )


def system_metrics(job: TrainJob) -> Any:
    """MLflow's monitor of this node's CPU, memory and GPU, logging into the run (rank 0)."""
    if not (job.system_metrics_every and job.tracking_uri and job.mlflow_run_id):
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        job.mlflow_run_id,
        sampling_interval=job.system_metrics_every,
        resume_logging=True,
        tracking_uri=job.tracking_uri,
    )
    monitor.start()
    return monitor
