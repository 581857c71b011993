"""The Ray Train worker: ``train_worker(config)`` runs on every rank.

Build the loader and model, resume from the run's newest checkpoint that loads, then train in
stretches: up to the end of the epoch or to the next ``train.checkpoint_every`` iteration. At an
epoch's end due for evaluation, validate and report the metrics with a checkpoint; at a
``checkpoint_every`` boundary, report a checkpoint alone. Rank 0 writes every checkpoint (every
rank reports, as Ray Train V2 requires) and logs metrics to MLflow. A resumed run replays the data
stream to the batch it stopped at and restores every rank's RNGs: it equals an uninterrupted one.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from danet import build_danet
from danet.losses import Ohem, class_weights, segmentation_loss
from danet.metrics import summarize
from danet.model import SegmentationModel
from pipeline import logs
from pipeline.data.loader import EvalStream, TrainStream, eval_loader, train_loader
from pipeline.errors import TrainingDiverged
from pipeline.training.checkpoint import TrainState, load_latest, mark_diverged, save_checkpoint
from pipeline.training.job import TrainJob
from pipeline.training.loop import (
    BatchFn,
    LossFn,
    build_optimizer,
    poly_schedule,
    to_device,
    train_steps,
    validate,
)
from pipeline.training.records import EvalRecord, History
from pipeline.training.tracker import Tracker, system_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Best:
    """The best evaluation of a run so far: its val mIoU, the weights and the confusion matrix."""

    miou: float
    weights: dict[str, torch.Tensor]
    confusion: torch.Tensor


@dataclass
class Run:
    """One rank's training: the model, its optimizer and schedule, the data, where it stands."""

    job: TrainJob
    rank: int
    world: int
    device: torch.device
    model: nn.Module  # as it is stepped: DDP and/or compiled
    core: SegmentationModel  # the plain module inside
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: LossFn
    stream: TrainStream
    loader: DataLoader
    val_loader: DataLoader
    batch_fn: BatchFn = to_device
    history: History = field(default_factory=History)
    epoch: int = 0
    batch: int = 0
    best: Best | None = None  # the best evaluation so far

    @property
    def iteration(self) -> int:
        return int(self.scheduler.last_epoch)


def _gather(state: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor, on every rank (so rank 0 can save them all)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def _maybe_crash(job: TrainJob, epoch: int, rank: int) -> None:
    """Test hook: kill this worker process once, as a lost node would."""
    if job.fault is None:
        return
    at_epoch, at_rank, marker = job.fault
    if epoch == at_epoch and rank == at_rank and not Path(marker).exists():
        Path(marker).write_text("crashed once")
        os._exit(1)


def build_loss(job: TrainJob, device: torch.device) -> LossFn:
    """The three (or four) weighted cross-entropies, with OHEM and class weights when asked."""
    t = job.train
    weight = class_weights(t.class_weights, job.class_pixels, job.class_image_pixels)
    return functools.partial(
        segmentation_loss,
        weights=t.loss_weights,
        class_weight=weight.to(device) if weight is not None else None,
        ohem=Ohem(t.ohem_thresh, t.ohem_min_kept) if t.loss == "ohem" else None,
    )


def build_model(
    job: TrainJob, world: int, device: torch.device, weights: Any = None
) -> tuple[nn.Module, SegmentationModel]:
    """The model as Ray prepares it (device, DDP; SyncBN and channels_last when asked), with the
    backbone weights the driver shipped (``weights``: an object ref) instead of a download."""
    import dataclasses

    import ray
    import ray.train.torch

    from pipeline.training.finetune import init_from

    config = job.model.to_danet_config(job.num_classes)
    model = build_danet(dataclasses.replace(config, pretrained=False, pretrained_path=None))
    if weights is not None:
        model.backbone.load_weights(ray.get(weights))
    if job.model.init_from:
        init_from(model, job.model.init_from, job.tracking_uri)
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if job.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    wrapped = ray.train.torch.prepare_model(model)  # moves to device; DDP when world > 1
    core: SegmentationModel = wrapped.module if hasattr(wrapped, "module") else wrapped  # type: ignore[assignment]
    return wrapped, core


def setup(job: TrainJob, weights: Any = None) -> Run:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(job.train.seed * 1000 + rank)
    wrapped, core = build_model(job, world, device, weights)
    t = job.train
    optimizer = build_optimizer(core, t.lr, t.momentum, t.weight_decay, t.head_lr_mult)
    stream = TrainStream(
        job.train_shards,
        batch_size=t.worker_batch,
        batches_per_epoch=t.iters_per_epoch,
        augment=job.data,
        mean=job.mean,
        std=job.std,
        rank=rank,
        world_size=world,
        seed=t.seed,
        shuffle_buffer=job.data.shuffle_buffer,
        gpu_decode=job.data.gpu_decode and device.type == "cuda",
    )
    val = EvalStream(job.val_shards, job.mean, job.std, rank=rank, world_size=world)
    batch_fn: BatchFn = to_device
    if stream.gpu_decode:
        from pipeline.data.gpu import decode_batch

        crop, mean, std = job.data.crop_size, job.mean, job.std
        batch_fn = lambda batch, dev: decode_batch(batch, crop, mean, std, dev)  # noqa: E731
    return Run(
        job=job,
        rank=rank,
        world=world,
        device=device,
        model=torch.compile(wrapped) if t.compile else wrapped,  # type: ignore[arg-type]
        core=core,
        optimizer=optimizer,
        scheduler=poly_schedule(optimizer, t.max_iters, t.poly_power),
        loss_fn=build_loss(job, device),
        stream=stream,
        loader=train_loader(stream, job.data.loader_workers, pin_memory=device.type == "cuda"),
        val_loader=eval_loader(val, job.data.loader_workers),
        batch_fn=batch_fn,
    )


def resume(run: Run, run_dir: str) -> None:
    """Continue from the newest checkpoint that loads, if the run has one."""
    import ray.train

    latest = ray.train.get_checkpoint()
    loaded = load_latest(latest, run_dir, run.device)
    if loaded is None:
        return
    state, run.history = loaded
    run.core.load_state_dict(state.model)
    run.optimizer.load_state_dict(state.optimizer)
    run.scheduler.load_state_dict(state.scheduler)
    torch.set_rng_state(state.rng[run.rank].cpu())
    if state.cuda_rng and run.device.type == "cuda":
        torch.cuda.set_rng_state(state.cuda_rng[run.rank].cpu(), run.device)
    run.epoch, run.batch = state.epoch, state.batch
    if state.best_model is not None and state.best_confusion is not None:
        run.best = Best(run.history.best().miou, state.best_model, state.best_confusion)
    if run.rank == 0:
        log.info(
            "[train] resumed at iteration %d (epoch %d, batch %d)",
            run.iteration,
            run.epoch,
            run.batch,
        )


def report(run: Run, metrics: dict[str, float]) -> None:
    """Every rank reports; rank 0 attaches the checkpoint of where the run stands."""
    import ray.train

    rng = _gather(torch.get_rng_state())
    cuda_rng = _gather(torch.cuda.get_rng_state(run.device)) if run.device.type == "cuda" else []
    if run.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    state = TrainState(
        model=run.core.state_dict(),
        optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(),
        epoch=run.epoch,
        batch=run.batch,
        iteration=run.iteration,
        rng=rng,
        cuda_rng=cuda_rng,
        best_model=run.best.weights if run.best else None,
        best_confusion=run.best.confusion if run.best else None,
    )
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(Path(directory), state, run.history, run.job.train.max_iters)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def evaluate(run: Run, train_loss: float) -> EvalRecord:
    cm = validate(run.core, run.val_loader, run.job.num_classes, run.device)
    result = summarize(cm.matrix)
    record = EvalRecord(
        epoch=run.epoch,
        iteration=run.iteration,
        train_loss=train_loss,
        **result,
    )
    run.history.evals.append(record)
    if run.best is None or record.miou > run.best.miou:
        weights = {k: v.detach().cpu().clone() for k, v in run.core.state_dict().items()}
        run.best = Best(record.miou, weights, cm.matrix.cpu())
    return record


def stretches(run: Run, tracker: Tracker | None) -> Iterator[float]:
    """Train the current epoch in stretches that end at checkpoint boundaries; yields the mean
    loss of each stretch, after which the run stands at a boundary or the epoch's end."""
    t = run.job.train
    run.stream.set_epoch(run.epoch, skip=run.batch)
    batches = iter(run.loader)
    done = run.batch
    while done < t.iters_per_epoch:
        n = t.iters_per_epoch - done
        if t.checkpoint_every:
            n = min(n, t.checkpoint_every - run.iteration % t.checkpoint_every)
        summary = train_steps(
            run.model,
            itertools.islice(batches, n),
            run.optimizer,
            run.scheduler,
            run.loss_fn,
            run.device,
            bf16=t.bf16,
            channels_last=t.channels_last,
            grad_clip=t.grad_clip,
            on_log=tracker.step if tracker else None,
            log_every=t.log_every,
            world_size=run.world,
            batch_fn=run.batch_fn,
        )
        done += n
        run.batch = done
        yield summary.loss


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: build, resume if a checkpoint exists, train, evaluate, report."""
    logs.show()
    run = setup(config["job"], config.get("weights"))
    resume(run, config["run_dir"])
    tracker = Tracker(run.job, run.history) if run.rank == 0 else None
    monitor = system_metrics(run.job) if run.rank == 0 else None
    try:
        train_epochs(run, tracker)
    except TrainingDiverged as err:
        # Marked, not raised: a raised error would make Ray retry a run that diverges again.
        # Every rank got here at the same step (the flag is all-reduced); the driver refuses it.
        if run.rank == 0:
            log.error("[train] %s", err.message)
            mark_diverged(config["run_dir"], err.iteration, err.loss)
    finally:
        if monitor is not None:
            monitor.finish()


def train_epochs(run: Run, tracker: Tracker | None) -> None:
    t = run.job.train
    while run.epoch < t.epochs:
        _maybe_crash(run.job, run.epoch, run.rank)
        for loss in stretches(run, tracker):
            epoch_done = run.batch == t.iters_per_epoch
            due = (run.epoch + 1) % t.eval_every_epochs == 0 or run.epoch + 1 == t.epochs
            if epoch_done and due:
                record = evaluate(run, loss)
                if tracker:
                    tracker.evaluation(record)
                    tracker.overlays(run.core, run.device, record.iteration)
                run.epoch, run.batch = run.epoch + 1, 0
                report(run, record.metrics())
            elif t.checkpoint_every and run.iteration % t.checkpoint_every == 0:
                if epoch_done:
                    run.epoch, run.batch = run.epoch + 1, 0
                report(run, {"iteration": run.iteration})
        if run.batch == t.iters_per_epoch:  # an epoch that ended without a report
            run.epoch, run.batch = run.epoch + 1, 0
