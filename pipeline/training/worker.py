"""The Ray Train worker: ``train_worker(config)`` runs on every rank.

It opens the rank's training session (pipeline/training/session.py: Ray-free) on the device and
with the model preparation Ray Train gives it, resumes from the run's newest checkpoint that
loads, then trains: at an epoch's end due for evaluation the session reports the metrics and
this worker attaches a checkpoint; at a ``checkpoint_every`` boundary, a checkpoint alone. Rank
0 writes every checkpoint (every rank reports, as Ray Train V2 requires) and logs metrics to
MLflow. A resumed run replays the data stream to the batch it stopped at and restores every
rank's RNGs: it equals an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline import logs
from pipeline.errors import TrainingDiverged
from pipeline.training.checkpoint import load_latest, mark_diverged, save_checkpoint
from pipeline.training.session import Session, open_session, restore, snapshot, train_epochs
from pipeline.training.tracker import Tracker, system_metrics

log = logging.getLogger(__name__)


def _gather(state: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor, on every rank (so rank 0 can save them all)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def crash_once(fault: tuple[int, int, str] | None) -> Any:
    """Test seam (``run_training(fault=...)``, never a param): kill this worker process once at
    (epoch, rank), as a lost node would; ``marker`` records that it happened."""
    if fault is None:
        return None
    at_epoch, at_rank, marker = fault

    def before_epoch(run: Session) -> None:
        if run.epoch == at_epoch and run.rank == at_rank and not Path(marker).exists():
            Path(marker).write_text("crashed once")
            os._exit(1)

    return before_epoch


def setup(job: Any, weights: Any = None) -> Session:
    """This rank's session on the device Ray Train gives it, prepared by Ray (DDP when world > 1);
    ``weights``: the backbone's pretrained weights in Ray's object store."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return open_session(
        job,
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        device=ray.train.torch.get_device(),
        weights=ray.get(weights) if weights is not None else None,
        prepare=ray.train.torch.prepare_model,
    )


def resume(run: Session, run_dir: str) -> None:
    """Continue from the newest checkpoint that loads, if the run has one."""
    import ray.train

    loaded = load_latest(ray.train.get_checkpoint(), run_dir, run.device)
    if loaded is None:
        return
    restore(run, *loaded)
    if run.rank == 0:
        log.info(
            "[train] resumed at iteration %d (epoch %d, batch %d)",
            run.iteration,
            run.epoch,
            run.batch,
        )


def report(run: Session, metrics: dict[str, float]) -> None:
    """Every rank reports; rank 0 attaches the checkpoint of where the run stands."""
    import ray.train

    rng = _gather(torch.get_rng_state())
    cuda_rng = _gather(torch.cuda.get_rng_state(run.device)) if run.device.type == "cuda" else []
    if run.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(
            Path(directory), snapshot(run, rng, cuda_rng), run.history, run.job.train.max_iters
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: build, resume if a checkpoint exists, train, evaluate, report."""
    logs.show()
    run = setup(config["job"], config.get("weights"))
    resume(run, config["run_dir"])
    tracker = Tracker(run.job, run.history) if run.rank == 0 else None
    if tracker:  # one micro-batch's FLOPs, counted once: MFU on every progress line
        tracker.count_flops(run.core, run.device, run.world)
    monitor = system_metrics(run.job) if run.rank == 0 else None
    try:
        train_epochs(run, tracker, report, crash_once(config.get("fault")))
    except TrainingDiverged as err:
        # Marked, not raised: a raised error would make Ray retry a run that diverges again.
        # Every rank got here at the same step (the flag is all-reduced); the driver refuses it.
        if run.rank == 0:
            log.error("[train] %s", err.message)
            mark_diverged(config["run_dir"], err.iteration, err.loss)
    finally:
        if monitor is not None:
            monitor.finish()
