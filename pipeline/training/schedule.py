"""The learning-rate schedule of the paper (Sec. 4.1) and the official code, the poly policy
lr = base (1 - iter / max_iter)^0.9 stepped every iteration, with mmsegmentation's optional
linear warm-up in front (mmcv's form: the warm-up factor multiplies the poly lr)."""

from __future__ import annotations

import torch


class PolyLR(torch.optim.lr_scheduler.LRScheduler):
    """lr_i = lr_0 (1 - i / total_iters)^power x warm(i), warm rising linearly from
    ``warmup_ratio`` to 1 over the first ``warmup_iters`` iterations (mmseg's poly with a
    ``linear`` warm-up, mmcv's form: the warm-up multiplies the poly lr).

    Chainable, as torch's ``PolynomialLR``: each step multiplies the groups' current lr by the
    factor's ratio to the step before, so a recovery's lr cut (pipeline/training/recovery.py)
    carries on through the rest of the schedule. Without a warm-up it equals ``PolynomialLR``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_iters: int,
        power: float,
        warmup_iters: int = 0,
        warmup_ratio: float = 1e-6,
    ) -> None:
        self.total_iters, self.power = total_iters, power
        self.warmup_iters, self.warmup_ratio = warmup_iters, warmup_ratio
        super().__init__(optimizer)

    def factor(self, i: int) -> float:
        """The schedule's multiplier of the base lr at iteration ``i``."""
        poly = max(0.0, 1.0 - i / self.total_iters) ** self.power
        if i >= self.warmup_iters:
            return poly
        return poly * (self.warmup_ratio + (1.0 - self.warmup_ratio) * i / self.warmup_iters)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        i = self.last_epoch
        lrs = [float(group["lr"]) for group in self.optimizer.param_groups]
        if i == 0:  # the first lr: the base lr times the factor at 0
            return [lr * self.factor(0) for lr in lrs]
        if i > self.total_iters:
            return lrs
        before = self.factor(i - 1)
        ratio = self.factor(i) / before if before > 0 else 0.0
        return [lr * ratio for lr in lrs]


def poly_schedule(
    optimizer: torch.optim.Optimizer,
    max_iters: int,
    power: float,
    warmup_iters: int = 0,
    warmup_ratio: float = 1e-6,
) -> PolyLR:
    """The poly schedule (with mmseg's linear warm-up when ``warmup_iters``); ``step()`` once
    per iteration."""
    return PolyLR(optimizer, max_iters, power, warmup_iters, warmup_ratio)
