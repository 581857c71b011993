"""A training session without Ray: build the model, optimizer, loss and data streams of a job
on one rank, restore it from a checkpoint's content, train in stretches that end at checkpoint
boundaries, evaluate, and snapshot where it stands. The Ray Train worker
(pipeline/training/worker.py) drives it on every rank and reports to Ray; bench/ and the fast
tests drive it in one process.

Where a run stands is the session's ``epoch`` and ``batch`` (the batch within the epoch) and the
scheduler's step count (``iteration``); ``train_epochs`` alone moves them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from danet.metrics import summarize
from danet.model import SegmentationModel, Segmenter
from pipeline.config import ConfigError
from pipeline.data.loader import TrainStream, train_loader
from pipeline.errors import first_line
from pipeline.sections import ModelParams
from pipeline.training.builder import Prepare, build_step, step_options
from pipeline.training.checkpoint import TrainState
from pipeline.training.job import TrainJob
from pipeline.training.loop import BatchFn, LossFn, to_device, train_steps, validate
from pipeline.training.prefetch import DEPTH, Prefetcher, on_device
from pipeline.training.records import EvalRecord, History
from pipeline.training.recovery import Recovery
from pipeline.training.tracker import Tracker

Report = Callable[["Session", dict[str, float]], None]  # at an evaluation or checkpoint boundary


@dataclass(frozen=True)
class Best:
    """The best evaluation of a run so far: its val mIoU, the weights and the confusion matrix."""

    miou: float
    weights: dict[str, torch.Tensor]
    confusion: torch.Tensor


@dataclass
class Session:
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
    segmenter: Segmenter  # the core with its normalisation: what validation runs
    batch_fn: BatchFn = to_device
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scale
    recovery: Recovery | None = None  # back to the last good state from a bad log window
    prefetch: int = 0  # batches prepared ahead by a thread (pipeline/training/prefetch.py)
    history: History = field(default_factory=History)
    epoch: int = 0
    batch: int = 0
    best: Best | None = None  # the best evaluation so far

    @property
    def iteration(self) -> int:
        return int(self.scheduler.last_epoch)


def backbone_weights(model: ModelParams) -> dict[str, Any] | None:
    """ImageNet weights for the backbone, fetched once here (``pretrained``: through timm, which
    needs the network or its cache; ``pretrained_path``: a local file) and shipped to the workers
    through Ray's object store: nodes need no network and no copy of the file."""
    import timm
    import torch

    try:
        if model.pretrained_path:
            return dict(torch.load(model.pretrained_path, map_location="cpu", weights_only=True))
        if model.pretrained:
            return dict(timm.create_model(model.backbone, pretrained=True).state_dict())
    except (OSError, RuntimeError, ValueError) as err:
        name = "model.pretrained_path" if model.pretrained_path else "model.pretrained"
        raise ConfigError(
            f"{name}: the backbone's ImageNet weights cannot be loaded ({first_line(err)})"
        ) from None
    return None


def open_session(
    job: TrainJob,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    weights: Any = None,
    prepare: Prepare | None = None,
) -> Session:
    """A job's session on rank ``rank`` of ``world``, at iteration 0."""
    device = device or torch.device("cpu")
    step = build_step(job, device, rank, world, weights, prepare)  # what the benches time too
    t, core, optimizer = job.train, step.core, step.optimizer
    recovery = Recovery(core, optimizer, t.spike_factor, t.recover_lr_factor, t.max_recoveries)
    recovery.trust(0)  # the initial weights: where a first bad window goes back to
    stream = TrainStream(  # in micro-batches: train.accumulate per iteration
        job.train_shards,
        batch_size=t.worker_batch,
        batches_per_epoch=t.iters_per_epoch * t.accumulate,
        augment=job.data,
        mean=job.mean,
        std=job.std,
        rank=rank,
        world_size=world,
        seed=t.seed,
        shuffle_buffer=job.data.shuffle_buffer,
        gpu_decode=job.data.gpu_decode and device.type == "cuda",
    )
    return Session(
        job=job,
        rank=rank,
        world=world,
        device=device,
        model=step.model,
        core=core,
        optimizer=optimizer,
        scheduler=step.scheduler,
        loss_fn=step.loss_fn,
        stream=stream,
        loader=train_loader(stream, job.data.loader_workers, pin_memory=device.type == "cuda"),
        segmenter=Segmenter(core, job.mean, job.std).to(device),
        batch_fn=step.batch_fn,
        scaler=step.scaler,
        recovery=recovery,
        prefetch=DEPTH if device.type == "cuda" else 0,  # a CPU's step is faster in turn
    )


def restore(run: Session, state: TrainState, history: History) -> None:
    """Put the session where a checkpoint says it stood: weights, optimizer, schedule, this
    rank's RNGs, the position in the data stream, the history and the best evaluation."""
    run.history = history
    run.core.load_state_dict(state.model)
    run.optimizer.load_state_dict(state.optimizer)
    run.scheduler.load_state_dict(state.scheduler)
    if run.scaler is not None and state.scaler:
        run.scaler.load_state_dict(state.scaler)
    torch.set_rng_state(state.rng[run.rank].cpu())
    if state.cuda_rng and run.device.type == "cuda":
        torch.cuda.set_rng_state(state.cuda_rng[run.rank].cpu(), run.device)
    run.epoch, run.batch = state.epoch, state.batch
    if state.best_model is not None and state.best_confusion is not None:
        run.best = Best(history.best().miou, state.best_model, state.best_confusion)
    if run.recovery is not None:  # the recoveries so far; the state loaded is the good one
        run.recovery.recoveries, run.recovery.loss_mean = state.recoveries, state.loss_mean
        run.recovery.trust(run.iteration)


def snapshot(
    run: Session, rng: list[torch.Tensor] | None = None, cuda_rng: list[torch.Tensor] | None = None
) -> TrainState:
    """Where the session stands, as a checkpoint holds it (``rng``: every rank's CPU RNG state;
    this rank's alone by default)."""
    return TrainState(
        model=run.core.state_dict(),
        optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(),
        epoch=run.epoch,
        batch=run.batch,
        iteration=run.iteration,
        rng=rng if rng is not None else [torch.get_rng_state()],
        cuda_rng=cuda_rng or [],
        best_model=run.best.weights if run.best else None,
        best_confusion=run.best.confusion if run.best else None,
        scaler=run.scaler.state_dict() if run.scaler is not None else None,
        recoveries=run.recovery.recoveries if run.recovery is not None else 0,
        loss_mean=run.recovery.loss_mean if run.recovery is not None else None,
    )


def evaluate(run: Session, train_loss: float) -> EvalRecord:
    job = run.job
    cm = validate(
        run.segmenter,
        job.val_shards,
        job.num_classes,
        run.device,
        workers=job.data.loader_workers,
        rank=run.rank,
        world_size=run.world,
    )
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


def stretches(run: Session, tracker: Tracker | None) -> Iterator[float]:
    """Train the current epoch in stretches that end at checkpoint boundaries; yields the mean
    loss of each stretch, after which the run stands at a boundary or the epoch's end."""
    t = run.job.train
    run.stream.set_epoch(run.epoch, skip=run.batch * t.accumulate)  # on a step boundary
    # batch N+1 made (on CUDA: on a side stream) while step N runs; in turn when prefetch is 0
    batches = Prefetcher(run.loader, run.batch_fn, run.device, run.prefetch, t.channels_last)
    done = run.batch
    while done < t.iters_per_epoch:
        n = t.iters_per_epoch - done
        if t.checkpoint_every:
            n = min(n, t.checkpoint_every - run.iteration % t.checkpoint_every)
        summary = train_steps(
            run.model,
            itertools.islice(batches, n * t.accumulate),
            run.optimizer,
            run.scheduler,
            run.loss_fn,
            run.device,
            scaler=run.scaler,
            on_log=tracker.step if tracker else None,
            log_every=t.log_every,
            world_size=run.world,
            batch_fn=on_device,  # ``batches`` made them
            recovery=run.recovery,
            **step_options(t),  # the recipe's options, as the benches pass them
        )
        done += n
        run.batch = done
        yield summary.loss
    batches.close()  # the loader's iterator is free for the next epoch


def train_epochs(
    run: Session,
    tracker: Tracker | None,
    report: Report,
    before_epoch: Callable[[Session], None] | None = None,
) -> None:
    """Train to the job's last epoch: evaluate when an epoch due for it ends, then ``report``
    its metrics (the caller checkpoints); at a ``checkpoint_every`` boundary ``report`` the
    iteration alone. ``before_epoch``: a test seam (a worker that dies at an epoch)."""
    t = run.job.train
    if tracker and run.recovery is not None:
        run.recovery.on_recover = tracker.recovery
    if tracker and run.iteration == 0:  # the untrained model's overlays: the image view's step 0
        tracker.overlays(run.core, run.device, 0)
    while run.epoch < t.epochs:
        if before_epoch is not None:
            before_epoch(run)
        for loss in stretches(run, tracker):
            epoch_done = run.batch == t.iters_per_epoch
            due = (run.epoch + 1) % t.eval_every_epochs == 0 or run.epoch + 1 == t.epochs
            if epoch_done and due:
                record = evaluate(run, loss)
                if tracker:
                    tracker.evaluation(record)
                    tracker.overlays(run.core, run.device, record.iteration)
                    if run.epoch + 1 == t.epochs:  # the last evaluation: what it attends to
                        tracker.attention(run.core, run.device, record.iteration)
                run.epoch, run.batch = run.epoch + 1, 0
                report(run, record.metrics())
            elif t.checkpoint_every and run.iteration % t.checkpoint_every == 0:
                if epoch_done:
                    run.epoch, run.batch = run.epoch + 1, 0
                report(run, {"iteration": run.iteration})
        if run.batch == t.iters_per_epoch:  # an epoch that ended without a report
            run.epoch, run.batch = run.epoch + 1, 0
