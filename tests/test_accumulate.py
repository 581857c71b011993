"""Gradient accumulation and fp16 loss scaling in the training loop (no Ray, on the CPU)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError, load_params
from pipeline.training.loop import build_optimizer, grad_scaler, poly_schedule, train_steps

CPU = torch.device("cpu")


class NoBatchStats(nn.Module):
    """A segmenter without batch statistics (GroupNorm), with DANet's backbone/head split and a
    DDP-like ``no_sync`` that counts its uses."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.head = nn.Conv2d(8, classes, 1)
        self.unsynced = 0

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.head(self.backbone(x))}

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        self.unsynced += 1
        yield


def ce(
    logits: Mapping[str, torch.Tensor], labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = F.cross_entropy(logits["out"], labels)
    return loss, {"out": loss.detach()}


def one_step(
    model: NoBatchStats, batches: list[tuple[torch.Tensor, torch.Tensor]], accumulate: int
) -> tuple[float, int]:
    optimizer = build_optimizer(model, 0.1, 0.0, 0.0, 1.0)  # type: ignore[arg-type]
    scheduler = poly_schedule(optimizer, 10, 0.9)
    record = train_steps(
        model, batches, optimizer, scheduler, ce, CPU, accumulate=accumulate, log_every=100
    )
    return record.loss, int(scheduler.last_epoch)


def test_accumulated_micro_batches_equal_one_big_batch() -> None:
    """4 micro-batches of 2 images make the gradient (and so the step) of one batch of 8; the
    schedule counts one optimizer step; the first 3 backward passes run under no_sync."""
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 12, 12), torch.randint(0, 4, (8, 12, 12))
    big, small = NoBatchStats(), None
    small = copy.deepcopy(big)
    big_loss, big_steps = one_step(big, [(x, y)], accumulate=1)
    micro = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)]
    small_loss, small_steps = one_step(small, micro, accumulate=4)
    assert big_steps == small_steps == 1
    assert small_loss == pytest.approx(big_loss, rel=1e-5)  # the mean of the micro-batches'
    for (name, a), b in zip(big.named_parameters(), small.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert (big.unsynced, small.unsynced) == (0, 3)


def test_a_short_last_group_is_not_stepped() -> None:
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 4, (6, 8, 8))
    model = NoBatchStats()
    _, steps = one_step(model, [(x[i : i + 2], y[i : i + 2]) for i in range(0, 6, 2)], 2)
    assert steps == 1


def fp16_steps(scaler: torch.amp.GradScaler, steps: int = 3) -> tuple[NoBatchStats, int, float]:
    torch.manual_seed(0)
    model = NoBatchStats()
    before = copy.deepcopy(model)
    optimizer = build_optimizer(model, 0.1, 0.9, 1e-4, 10.0)  # type: ignore[arg-type]
    scheduler = poly_schedule(optimizer, 10, 0.9)
    x, y = torch.rand(2, 3, 12, 12), torch.randint(0, 4, (2, 12, 12))
    record = train_steps(
        model, [(x, y)] * steps, optimizer, scheduler, ce, CPU, precision="fp16", scaler=scaler
    )
    moved = sum(
        float((a - b).detach().abs().sum())
        for a, b in zip(model.parameters(), before.parameters(), strict=True)
    )
    assert int(scheduler.last_epoch) == steps  # a skipped step still moves the schedule
    assert math.isfinite(record.loss)
    assert record.skipped_steps is not None
    assert ("skipped_steps" in record.mlflow_metrics()) is True
    return model, record.skipped_steps, moved


def test_fp16_skips_the_steps_whose_scaled_gradients_overflow_and_counts_them() -> None:
    """A scale of 2^100 overflows fp16's gradients: every step is skipped (the weights do not
    move), each one counted and the scale halved; at torch's 2^16 the same steps train."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    _, skipped, moved = fp16_steps(scaler)
    assert skipped == 3 and moved == 0.0 and scaler.get_scale() == 2.0**97
    default = grad_scaler("fp16", CPU)
    assert default is not None and default.get_scale() == 2.0**16
    _, skipped, moved = fp16_steps(default)
    assert skipped == 0 and moved > 0


def test_fp16_autocast_runs_danet_in_half_and_only_fp16_gets_a_scaler() -> None:
    """(The attention's fp16 numerics: tests/test_attention.py, against fp32.)"""
    from danet import DANetConfig, build_danet
    from pipeline.devices import autocast

    model = build_danet(DANetConfig(num_classes=3, backbone="resnet18d", pretrained=False))
    with torch.no_grad(), autocast(CPU, "fp16"):
        out = model.eval()(torch.rand(1, 3, 32, 32))
    assert out["out"].dtype == torch.float16 and torch.isfinite(out["out"]).all()
    assert grad_scaler("bf16", CPU) is None and grad_scaler("fp32", CPU) is None


def test_precision_and_accumulate_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"train.precision must be one of"):
        load_params(overrides=["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"train.bf16 is gone: use train.precision"):
        load_params(overrides=["train.bf16=true"])
    with pytest.raises(ConfigError, match=r"train.batch_size 8 does not split evenly"):
        load_params(overrides=["train.batch_size=8", "train.accumulate=3"])
    assert load_params(overrides=["train.accumulate=4"]).train.worker_batch == 2
