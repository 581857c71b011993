"""The plain-torch training step: bf16 autocast on CPUs that compute bf16 natively."""

from __future__ import annotations

import pytest
import torch

from danet import DANetConfig, build_danet
from danet.losses import segmentation_loss
from pipeline.devices import autocast, cpu_has_bf16
from pipeline.training.loop import build_optimizer, poly_schedule, train_steps

CPU = torch.device("cpu")


def test_cpu_autocast_follows_the_cpu_bf16_support(monkeypatch: pytest.MonkeyPatch) -> None:
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    for native in (True, False):
        monkeypatch.setattr("pipeline.devices.cpu_has_bf16", lambda native=native: native)
        with autocast(CPU, "bf16"):
            assert conv(x).dtype == (torch.bfloat16 if native else torch.float32)
        with autocast(CPU, "fp32"):
            assert conv(x).dtype == torch.float32


def _losses(bf16: bool, channels_last: bool) -> list[float]:
    torch.manual_seed(0)
    model = build_danet(DANetConfig(num_classes=5, backbone="resnet18d", pretrained=False))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, 0.01, 0.9, 1e-4, 10.0)
    scheduler = poly_schedule(optimizer, 100, 0.9)
    x = torch.rand(2, 3, 48, 48)
    y = torch.randint(0, 5, (2, 48, 48))
    step = [(x, y)]
    return [
        train_steps(
            model,
            step,
            optimizer,
            scheduler,
            segmentation_loss,
            CPU,
            precision="bf16" if bf16 else "fp32",
            channels_last=channels_last,
        ).loss
        for _ in range(3)
    ]


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16")
def test_cpu_bf16_channels_last_steps_track_fp32() -> None:
    """Three SGD steps in bf16 autocast + channels_last give fp32's losses within 2%."""
    fp32, bf16 = _losses(False, False), _losses(True, True)
    assert bf16 == pytest.approx(fp32, rel=0.02), (fp32, bf16)


def test_without_recovery_a_window_of_non_finite_steps_stops_training() -> None:
    """A step with a NaN loss is skipped, not applied; a log window whose every step was
    non-finite raises ``TrainingDiverged`` at its end (not later, not per step) when there is no
    recovery, naming the iteration and what to change; the windows before it are finite."""
    import math
    import pickle

    from pipeline.errors import TrainingDiverged

    torch.manual_seed(0)
    model = build_danet(DANetConfig(num_classes=5, backbone="resnet18d", pretrained=False))
    optimizer = build_optimizer(model, 0.01, 0.9, 1e-4, 10.0)
    scheduler = poly_schedule(optimizer, 100, 0.9)
    batch = (torch.rand(1, 3, 32, 32), torch.randint(0, 5, (1, 32, 32)))
    calls: list[int] = []

    def loss_fn(logits, labels):  # finite for four steps, then NaN
        loss, parts = segmentation_loss(logits, labels)
        calls.append(len(calls))
        return (loss * math.nan if len(calls) > 4 else loss), parts

    logged: list[float] = []
    with pytest.raises(TrainingDiverged) as raised:
        train_steps(
            model,
            [batch] * 9,
            optimizer,
            scheduler,
            loss_fn,
            CPU,
            log_every=3,
            on_log=lambda record: logged.append(record.loss),
        )
    assert len(calls) == 9 and raised.value.iteration == 9  # the window of steps 7-9
    assert len(logged) == 2 and all(map(math.isfinite, logged))  # steps 5, 6 were skipped
    assert "training diverged: the loss is nan at iteration 9; lower train.lr" in str(raised.value)
    again = pickle.loads(pickle.dumps(raised.value))  # it crosses Ray's process boundary
    assert str(again) == str(raised.value)
