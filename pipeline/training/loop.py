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
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from danet.metrics import ConfusionMatrix
from danet.model import SegmentationModel
from pipeline.devices import autocast
from pipeline.errors import TrainingDiverged
from pipeline.training.records import StepRecord

LossFn = Callable[
    [Mapping[str, torch.Tensor], torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]
]
BatchFn = Callable[[Any, torch.device], tuple[torch.Tensor, torch.Tensor]]


def build_optimizer(
    model: SegmentationModel, lr: float, momentum: float, weight_decay: float, head_lr_mult: float
) -> torch.optim.SGD:
    """SGD with two parameter groups: the backbone at ``lr``, everything else at ``lr * mult``.

    ``foreach`` (one fused kernel per parameter group) wherever torch offers it.
    """
    groups = [
        {"params": list(model.backbone.parameters()), "lr": lr},
        {"params": model.head_parameters(), "lr": lr * head_lr_mult},
    ]
    return torch.optim.SGD(
        groups, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True
    )


def poly_schedule(
    optimizer: torch.optim.Optimizer, max_iters: int, power: float
) -> torch.optim.lr_scheduler.PolynomialLR:
    """lr_i = lr_0 (1 - i / max_iters)^power for every group; ``step()`` once per iteration."""
    return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max_iters, power=power)


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
) -> StepRecord:
    """One pass over ``batches`` (a stretch of an epoch: up to its end or the next checkpoint),
    ``accumulate`` micro-batches per optimizer step; returns the stretch's means.

    A step's gradient is the mean over its micro-batches (each loss / ``accumulate``): one big
    batch's for a model without batch statistics; under DDP the first ``accumulate - 1``
    backward passes skip the all-reduce (``no_sync``). Under fp16 ``scaler`` scales the loss; a
    step whose gradients overflowed is skipped and counted, the schedule moves on (mmseg's AMP).
    ``on_log`` gets a ``StepRecord`` every ``log_every`` steps (and for the remainder)."""
    model.train()
    epoch, window = _Window(device, scaler), _Window(device, scaler)
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
            for w in (epoch, window):
                w.add(loss, parts, len(images) * world_size, accumulate)
        skipped = step(optimizer, model, scaler, grad_clip)
        scheduler.step()
        for w in (epoch, window):
            w.steps, w.skipped = w.steps + 1, w.skipped + skipped
        if window.steps >= log_every:
            window.check_finite(int(scheduler.last_epoch))
            if on_log is not None:
                on_log(window.record(scheduler, optimizer))
            window = _Window(device, scaler)
    if window.steps:
        window.check_finite(int(scheduler.last_epoch))
        if on_log is not None:
            on_log(window.record(scheduler, optimizer))
    return epoch.record(scheduler, optimizer)


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
    model: nn.Module,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float,
) -> int:
    """The optimizer step (clipped, unscaled first under fp16); 1 if fp16 skipped it."""
    if scaler is None:
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return 0
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    # GradScaler.step reads its overflow flag on the host anyway: the scale costs no extra sync
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return int(scaler.get_scale() < before)


class _Window:
    """Running sums over some steps, on the device: read once, when the record is made."""

    def __init__(self, device: torch.device, scaler: Any = None) -> None:
        self.device, self.start = device, time.perf_counter()
        self.counts_skips = scaler is not None  # fp16: the skipped steps are reported
        self.sums: torch.Tensor | None = None
        self.names: list[str] = []
        self.steps = self.images = self.skipped = 0

    def add(
        self, loss: torch.Tensor, parts: Mapping[str, torch.Tensor], images: int, share: int = 1
    ) -> None:
        """A micro-batch's losses, 1/``share`` of its step's (the caller counts the step)."""
        values = torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())])
        values = values / share if share > 1 else values
        self.sums = values if self.sums is None else self.sums + values
        self.names = list(parts)
        self.images += images

    def check_finite(self, iteration: int) -> None:
        """Raise ``TrainingDiverged`` on every rank when any rank's loss went NaN or infinite.

        Once per log window, not per step: one host read (and, under DDP, one all-reduce of a
        flag, so that all ranks stop at the same step)."""
        if self.sums is None:
            return
        finite = torch.isfinite(self.sums).all().to(torch.int32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite):
            raise TrainingDiverged(iteration, float(self.sums[0] / self.steps))

    def record(self, scheduler: Any, optimizer: torch.optim.Optimizer) -> StepRecord:
        means = (self.sums / max(self.steps, 1)).tolist() if self.sums is not None else [0.0]
        seconds = time.perf_counter() - self.start  # after tolist(): the device has caught up
        return StepRecord(
            iteration=int(scheduler.last_epoch),
            loss=means[0],
            lr=float(optimizer.param_groups[0]["lr"]),
            lr_head=float(optimizer.param_groups[-1]["lr"]),
            images_per_s=self.images / seconds if seconds > 0 else 0.0,
            parts=dict(zip(self.names, means[1:], strict=True)),
            skipped_steps=self.skipped if self.counts_skips else None,
        )


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, object]],
    num_classes: int,
    device: torch.device,
    bf16: bool = False,
    ignore_index: int = 255,
) -> ConfusionMatrix:
    """Whole-image validation; the confusion matrix is summed over all workers once at the end.

    Pass the unwrapped model (not DDP): ranks may hold different numbers of images, and only the
    final all-reduce is collective.
    """
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, device=device)
    for images, labels, _ in batches:
        with autocast(device, "bf16" if bf16 else "fp32"):
            logits = model(images.to(device, non_blocking=True))["out"]
        cm.update(logits.argmax(1), labels.to(device, non_blocking=True))
    cm.reduce()
    return cm
