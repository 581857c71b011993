"""The training recipe in plain torch, no Ray: optimizer, poly schedule, train steps, validation.

As the paper (Sec. 4.1) and the official code: SGD with momentum 0.9 and weight decay, the head
at 10x the base learning rate, and the poly schedule lr = base (1 - iter / max_iter)^0.9 stepped
every iteration (torch's ``PolynomialLR``).

The step never waits on the host: losses stay on the device and are read once every
``log_every`` steps; images/s is wall clock over the whole loop, the loader's time included.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from danet.metrics import ConfusionMatrix
from danet.model import SegmentationModel
from pipeline.data.manifest import ShardRef
from pipeline.data.predictions import confusion, predictions
from pipeline.devices import autocast
from pipeline.errors import TrainingDiverged
from pipeline.training.records import StepRecord
from pipeline.training.recovery import Recovery, Verdict
from pipeline.training.schedule import poly_schedule as poly_schedule  # the step's schedule

LossFn = Callable[
    [Mapping[str, torch.Tensor], torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]
]
BatchFn = Callable[[Any, torch.device], tuple[torch.Tensor, torch.Tensor]]


def build_optimizer(
    model: SegmentationModel, lr: float, momentum: float, weight_decay: float, head_lr_mult: float
) -> torch.optim.SGD:
    """SGD with two parameter groups: the backbone at ``lr``, everything else at ``lr * mult``.

    ``fused`` (one kernel for all parameters, on CUDA and CPU): it takes a device-side
    ``found_inf`` flag, so a step with non-finite gradients is skipped without a host sync
    (``step``). ``foreach`` where a device has no fused SGD (then a skip reads the flag).
    """
    groups = [
        {"params": list(model.backbone.parameters()), "lr": lr},
        {"params": model.head_parameters(), "lr": lr * head_lr_mult},
    ]
    kwargs: dict[str, Any] = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    try:
        return torch.optim.SGD(groups, fused=True, **kwargs)
    except RuntimeError:  # a device without the fused kernel
        return torch.optim.SGD(groups, foreach=True, **kwargs)


def to_device(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A CPU batch ``(images, labels)`` onto the device (asynchronous from pinned memory)."""
    images, labels = batch
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16's loss scaler (torch's defaults: 2^16, halved on an overflow, doubled after 2000
    clean steps); None for fp32 and bf16, whose range needs none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def micro_batches(batches: Iterable[Any], accumulate: int) -> Iterator[list[Any]]:
    """``accumulate`` micro-batches per optimizer step (a short last group is not stepped: the
    stream holds whole steps)."""
    it = iter(batches)
    while len(group := list(itertools.islice(it, accumulate))) == accumulate:
        yield group


def train_steps(
    model: nn.Module,
    batches: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: LossFn,
    device: torch.device,
    *,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    accumulate: int = 1,
    channels_last: bool = False,
    grad_clip: float = 0.0,
    on_log: Callable[[StepRecord], None] | None = None,
    log_every: int = 10,
    world_size: int = 1,
    batch_fn: BatchFn = to_device,
    recovery: Recovery | None = None,
) -> StepRecord:
    """One pass over ``batches`` (a stretch of an epoch: up to its end or the next checkpoint),
    ``accumulate`` micro-batches per optimizer step; returns the stretch's means.

    A step's gradient is the mean over its micro-batches (each loss / ``accumulate``): one big
    batch's for a model without batch statistics; under DDP the first ``accumulate - 1``
    backward passes skip the all-reduce (``no_sync``). A step whose gradients are not finite is
    skipped on the device and counted, the schedule moves on (fp16: the scaler's overflow
    skips, mmseg's AMP; bf16 and fp32 alike). Every ``log_every`` steps the window is judged
    (pipeline/training/recovery.py): a bad one goes back to ``recovery``'s last good state, or
    raises ``TrainingDiverged`` without one; a good one goes to ``on_log`` as a ``StepRecord``.
    The end of the pass is a trusted state (a checkpoint boundary)."""
    model.train()
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    # what the window checks: the weights and BatchNorm's running statistics (a forward pass
    # over NaN pixels leaves them NaN even when its step is skipped)
    state = params + [b for b in model.buffers() if b.is_floating_point()]
    epoch, window = _Window(device), _Window(device)
    for group in micro_batches(batches, accumulate):
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(group):
            images, labels = batch_fn(batch, device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            sync = i == accumulate - 1  # DDP all-reduces at the last micro-batch only
            loss, parts = backward(
                model, images, labels, loss_fn, precision, scaler, sync, accumulate
            )
            window.add(loss, parts, images, labels, world_size, accumulate)
        found, norm = step(optimizer, params, scaler, grad_clip)
        scheduler.step()
        window.end_step(found, norm)
        if window.steps >= log_every:
            _close(window, epoch, scheduler, optimizer, state, scaler, recovery, on_log)
            window = _Window(device)
    if window.steps:
        _close(window, epoch, scheduler, optimizer, state, scaler, recovery, on_log)
    if recovery is not None:
        recovery.trust(int(scheduler.last_epoch))
    return epoch.record(scheduler, optimizer)


def _close(
    window: _Window,
    epoch: _Window,
    scheduler: Any,
    optimizer: torch.optim.Optimizer,
    state: list[torch.Tensor],
    scaler: torch.amp.GradScaler | None,
    recovery: Recovery | None,
    on_log: Callable[[StepRecord], None] | None,
) -> None:
    """Judge a finished window: recover from a bad one, log and keep a good one."""
    iteration = int(scheduler.last_epoch)
    # fp16's scaler skips steps while it searches its scale: all skipped is no verdict there
    verdict = window.verdict(iteration, state, all_skipped_is_bad=scaler is None)
    if recovery is not None:
        verdict = recovery.judge(verdict)
    if verdict.bad:
        if recovery is None:
            raise TrainingDiverged(iteration, verdict.loss)
        recovery.recover(verdict)  # raises TrainingDiverged when none is left
        return
    if recovery is not None:
        recovery.good(verdict, iteration)
    epoch.merge(window)
    if on_log is not None:
        on_log(window.record(scheduler, optimizer, verdict))


def backward(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: LossFn,
    precision: str,
    scaler: torch.amp.GradScaler | None,
    sync: bool,
    accumulate: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's forward and backward, its gradient added to ``accumulate - 1`` others';
    under DDP inside ``no_sync`` (forward included) unless ``sync``. Returns its losses."""
    no_sync: Any = getattr(model, "no_sync", None)  # DDP's
    with nullcontext() if sync or no_sync is None else no_sync():
        with autocast(images.device, precision):
            logits = model(images)
        if precision == "fp16":  # the loss in fp32: fp16's range ends at 6.5e4
            logits = {k: v.float() for k, v in logits.items()}
        loss, parts = loss_fn(logits, labels)
        scaled = loss / accumulate
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return loss, parts


def step(
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    scaler: torch.amp.GradScaler | None,
    grad_clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The optimizer step, skipped on the device when the gradients are not finite; returns
    that flag (1.0: skipped) and the gradient norm, both on the device, unread.

    The total gradient norm (after fp16's unscale) is one reduction that serves the clip and the
    check. The fused SGD takes the flag as ``found_inf`` and leaves weights and momentum alone,
    as it does under fp16's scaler (which computes the same flag itself): no host sync.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    norm = nn.utils.get_total_norm(grads).float()
    found = (~torch.isfinite(norm)).float()
    if grad_clip > 0:  # non-finite gradients become NaN here: their step is skipped anyway
        nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    elif getattr(optimizer, "_step_supports_amp_scaling", False):  # the fused kernel
        optimizer.found_inf = found  # type: ignore[attr-defined]
        optimizer.grad_scale = None  # type: ignore[attr-defined]
        optimizer.step()
        del optimizer.found_inf, optimizer.grad_scale  # type: ignore[attr-defined]
    elif not bool(found):  # no fused kernel on this device: one host read per step
        optimizer.step()
    return found, norm


class _Window:
    """Running sums over some steps, on the device: read once, when the window is judged.

    A step whose gradients were not finite is not applied; its losses are left out of the
    sums (they are counted as ``skipped``). The sums hold, in order: the step's loss, the sum of
    finite gradient norms, the skipped steps, micro-batches without a labelled pixel and
    micro-batches with non-finite pixels, then each output's loss."""

    STATS = 5  # loss, grad norm, skipped, empty, bad inputs

    def __init__(self, device: torch.device) -> None:
        self.device, self.start = device, time.perf_counter()
        self.sums: torch.Tensor | None = None
        self.step_sum: torch.Tensor | None = None  # the step in progress, over its micro-batches
        self.flags = torch.zeros(2, device=device)  # the step's empty and bad-input micro-batches
        self.names: list[str] = []
        self.steps = self.images = 0

    def add(
        self,
        loss: torch.Tensor,
        parts: Mapping[str, torch.Tensor],
        images: torch.Tensor,
        labels: torch.Tensor,
        world_size: int = 1,
        share: int = 1,
        ignore_index: int = 255,
    ) -> None:
        """A micro-batch's losses, 1/``share`` of its step's (``end_step`` counts the step)."""
        empty = (labels != ignore_index).any().logical_not()
        bad = torch.isfinite(images).all().logical_not()
        losses = torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())])
        values = losses / share if share > 1 else losses
        self.step_sum = values if self.step_sum is None else self.step_sum + values
        self.flags = self.flags + torch.stack([empty, bad]).float()
        self.names = list(parts)
        self.images += len(images) * world_size

    def end_step(self, found: torch.Tensor, norm: torch.Tensor) -> None:
        """The step is done: its losses count unless it was skipped (``found``)."""
        assert self.step_sum is not None
        losses = torch.where(found > 0, torch.zeros_like(self.step_sum), self.step_sum)
        finite_norm = torch.where(found > 0, torch.zeros_like(norm), norm)
        row = torch.cat([losses[:1], torch.stack([finite_norm, found]), self.flags, losses[1:]])
        self.sums = row if self.sums is None else self.sums + row
        self.step_sum, self.flags = None, torch.zeros_like(self.flags)
        self.steps += 1

    def merge(self, other: _Window) -> None:
        """Add a judged window (the stretch's sums hold the good windows only)."""
        if other.sums is None:
            return
        self.sums = other.sums if self.sums is None else self.sums + other.sums
        self.names, self.steps = other.names, self.steps + other.steps
        self.images += other.images

    def verdict(
        self, iteration: int, state: list[torch.Tensor], all_skipped_is_bad: bool = True
    ) -> Verdict:
        """What the window says, the same on every rank: one all-reduce of its counts (under
        DDP), one host read. Bad when a loss, a weight or a running statistic is not finite,
        or every step was."""
        assert self.sums is not None
        weights_finite = torch.isfinite(nn.utils.get_total_norm(state)).float()
        stats = torch.cat([self.sums[:5], (1 - weights_finite).view(1)])
        stats = torch.cat([stats, torch.isfinite(self.sums).all().logical_not().float().view(1)])
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)  # every rank the same verdict
            world = dist.get_world_size()
        loss, _, skipped, empty, bad_in, bad_weights, bad_loss = stats.tolist()
        applied = self.steps - skipped / world
        mean = loss / world / applied if applied > 0 else float("nan")
        reason = ""
        if bad_loss or bad_weights:
            reason = "non-finite weights" if bad_weights else "non-finite loss"
        elif applied <= 0 and all_skipped_is_bad:
            reason = "every step's gradients non-finite"
        return Verdict(
            iteration,
            mean if not bad_loss else float("nan"),
            self.steps,
            round(skipped / world),
            round(empty),
            round(bad_in),
            reason,
        )

    def record(
        self, scheduler: Any, optimizer: torch.optim.Optimizer, verdict: Verdict | None = None
    ) -> StepRecord:
        sums = self.sums.tolist() if self.sums is not None else [0.0] * (self.STATS + 1)
        seconds = time.perf_counter() - self.start  # after tolist(): the device has caught up
        skipped = int(sums[2])
        applied = max(self.steps - skipped, 1)
        return StepRecord(
            iteration=int(scheduler.last_epoch),
            loss=verdict.loss if verdict is not None else sums[0] / applied,
            lr=float(optimizer.param_groups[0]["lr"]),
            lr_head=float(optimizer.param_groups[-1]["lr"]),
            images_per_s=self.images / seconds if seconds > 0 else 0.0,
            parts={n: v / applied for n, v in zip(self.names, sums[self.STATS :], strict=True)},
            skipped_steps=skipped,
            grad_norm=sums[1] / applied,
            empty_batches=int(sums[3]),
        )


def validate(
    segmenter: nn.Module,
    shards: Sequence[ShardRef],
    num_classes: int,
    device: torch.device,
    *,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    bf16: bool = False,
) -> ConfusionMatrix:
    """Whole-image validation of rank ``rank``'s share of ``shards`` (read by ``workers``
    loader processes): the loop the evaluate stage runs (pipeline/data/predictions.py); the
    confusion matrix is summed over all ranks once at the end.

    ``segmenter``: the unwrapped model (not DDP) in its ``Segmenter``, which normalises the
    pixels as a model file does: ranks may hold different numbers of images, and only the
    final all-reduce is collective.
    """
    images = predictions(
        segmenter,
        shards,
        device,
        precision="bf16" if bf16 else "fp32",
        workers=workers,
        rank=rank,
        world_size=world_size,
    )
    cm, _ = confusion(images, num_classes, device)
    cm.reduce()
    return cm
