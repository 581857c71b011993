"""The training recipe in plain torch, no Ray: optimizer, poly schedule, train steps, evaluation.

As the paper (Sec. 4.1) and the official code: SGD with momentum 0.9 and weight decay 1e-4, the
head at 10x the base learning rate, and the poly schedule lr = base (1 - iter / max_iter)^0.9
stepped every iteration; the loss sums cross-entropy over the PAM, CAM and fused outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from danet.losses import segmentation_loss
from danet.metrics import ConfusionMatrix
from danet.model import SegmentationModel


def build_optimizer(
    model: SegmentationModel, lr: float, momentum: float, weight_decay: float, head_lr_mult: float
) -> torch.optim.SGD:
    """SGD with two parameter groups: the backbone at ``lr``, everything else at ``lr * mult``."""
    return torch.optim.SGD(
        [
            {"params": list(model.backbone.parameters()), "lr": lr},
            {"params": model.head_parameters(), "lr": lr * head_lr_mult},
        ],
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
    )


def poly_schedule(
    optimizer: torch.optim.Optimizer, max_iters: int, power: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """lr_i = lr_0 (1 - i / max_iters)^power for every group; call ``step()`` once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: max(0.0, 1.0 - min(i, max_iters) / max_iters) ** power
    )


@dataclass
class StepLog:
    """Running sums over the steps since the last log line."""

    losses: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    images: int = 0
    seconds: float = 0.0

    def add(
        self, total: float, parts: Mapping[str, torch.Tensor], images: int, seconds: float
    ) -> None:
        self.losses["loss"] = self.losses.get("loss", 0.0) + total
        for name, value in parts.items():
            self.losses[f"loss_{name}"] = self.losses.get(f"loss_{name}", 0.0) + float(value)
        self.steps += 1
        self.images += images
        self.seconds += seconds

    def summary(self) -> dict[str, float]:
        out = {k: v / max(self.steps, 1) for k, v in self.losses.items()}
        out["images_per_s"] = self.images / self.seconds if self.seconds > 0 else 0.0
        return out


def train_steps(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_weights: Mapping[str, float],
    device: torch.device,
    bf16: bool = False,
    channels_last: bool = False,
    grad_clip: float = 0.0,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    log_every: int = 10,
    world_size: int = 1,
) -> dict[str, float]:
    """One pass over ``batches`` (one epoch); returns the epoch's mean losses and throughput.

    ``on_log(iteration, metrics)`` is called every ``log_every`` steps with mean losses, the
    head-group learning rate and images/s (of this worker times ``world_size``).
    """
    model.train()
    epoch, window = StepLog(), StepLog()
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        if bf16 and device.type == "cuda"
        else nullcontext()
    )
    for images, labels in batches:
        start = time.perf_counter()
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(images)
        loss, parts = segmentation_loss(logits, labels, loss_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        n = images.shape[0] * world_size
        epoch.add(loss.item(), parts, n, seconds)
        window.add(loss.item(), parts, n, seconds)
        if on_log is not None and window.steps >= log_every:
            on_log(
                int(scheduler.last_epoch),
                {**window.summary(), "lr": optimizer.param_groups[-1]["lr"]},
            )
            window = StepLog()
    if on_log is not None and window.steps:  # the epoch's remainder
        on_log(
            int(scheduler.last_epoch), {**window.summary(), "lr": optimizer.param_groups[-1]["lr"]}
        )
    return {**epoch.summary(), "lr": optimizer.param_groups[-1]["lr"]}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, object]],
    num_classes: int,
    device: torch.device,
    ignore_index: int = 255,
) -> ConfusionMatrix:
    """Whole-image evaluation; the confusion matrix is summed over all workers once at the end.

    Pass the unwrapped model (not DDP): ranks may hold different numbers of images, and only the
    final all-reduce is collective.
    """
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, device=device)
    for images, labels, _ in batches:
        logits = model(images.to(device))["out"]
        cm.update(logits.argmax(1), labels.to(device))
    cm.reduce()
    return cm
