"""Checkpoint files without Ray Train: which checkpoint a run resumes from, and what is pruned."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from pipeline.training.checkpoint import (
    TrainState,
    checkpoint_dirs,
    finished_checkpoint,
    load_latest,
    prune_untracked,
    save_checkpoint,
)
from pipeline.training.records import History
from tests.conftest import DEVICES


def write(run_dir: Path, stamp: str, iteration: int, max_iters: int = 10) -> Path:
    folder = run_dir / f"checkpoint_2026-11-28_12-00-{stamp}"
    folder.mkdir(parents=True)
    state = TrainState(
        model={"w": torch.full((2,), float(iteration))},
        optimizer={},
        scheduler={},
        epoch=iteration // 2,
        batch=iteration % 2,
        iteration=iteration,
        rng=[torch.get_rng_state()],
    )
    save_checkpoint(folder, state, History(), max_iters)
    return folder


def test_resumes_from_the_newest_folder_even_one_ray_never_registered(tmp_path: Path) -> None:
    """A driver killed between the worker writing checkpoint 3 and Ray registering it: Ray's
    latest is checkpoint 2, the folder of 3 is there and complete -- resume from 3."""
    from ray.train import Checkpoint

    write(tmp_path, "01.000000", 1)
    registered = write(tmp_path, "02.000000", 2)
    write(tmp_path, "03.000000", 3)
    loaded = load_latest(Checkpoint(str(registered)), str(tmp_path), torch.device("cpu"))
    assert loaded is not None and loaded[0].iteration == 3
    unregistered = load_latest(None, str(tmp_path), torch.device("cpu"))  # Ray knows none
    assert unregistered is not None and unregistered[0].iteration == 3
    assert load_latest(None, str(tmp_path / "absent"), torch.device("cpu")) is None


def test_a_corrupt_newest_checkpoint_falls_back_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path, "01.000000", 1)
    newest = write(tmp_path, "02.000000", 2)
    (newest / "state.pt").write_bytes(b"half a file")
    with caplog.at_level(logging.WARNING):
        loaded = load_latest(None, str(tmp_path), torch.device("cpu"))
    assert loaded is not None and loaded[0].iteration == 1
    assert torch.equal(loaded[0].model["w"], torch.ones(2))
    assert any(
        "does not load" in r.getMessage() and newest.name in r.getMessage() for r in caplog.records
    )


def test_prune_keeps_what_ray_tracks_and_finished_reads_progress(tmp_path: Path) -> None:
    stale = write(tmp_path, "01.000000", 1)
    kept = [write(tmp_path, "02.000000", 5), write(tmp_path, "03.000000", 10)]
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's, not a folder
    prune_untracked(str(tmp_path), [str(k) for k in kept])
    assert not stale.exists() and [Path(d) for d in checkpoint_dirs(str(tmp_path))] == kept
    assert finished_checkpoint(str(tmp_path)) == str(kept[-1])  # iteration 10 of 10
    (kept[-1] / "progress.json").write_text(json.dumps({"iteration": 9, "max_iters": 10}))
    assert finished_checkpoint(str(tmp_path)) is None


def _train(device: torch.device, iterations: range, state: TrainState | None) -> TrainState:
    """DANet-R18d (dropout on) for ``iterations`` of seeded random batches, from ``state``."""
    from danet import DANetConfig, build_danet
    from danet.losses import segmentation_loss
    from pipeline.training.loop import build_optimizer, poly_schedule, train_steps

    torch.manual_seed(0)
    model = build_danet(DANetConfig(num_classes=5, backbone="resnet18d")).to(device)
    optimizer = build_optimizer(model, 0.01, 0.9, 1e-4, 10.0)
    scheduler = poly_schedule(optimizer, 6, 0.9)
    if state is not None:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        torch.set_rng_state(state.rng[0])
        if state.cuda_rng:
            torch.cuda.set_rng_state(state.cuda_rng[0], device)
    for i in iterations:  # the data of iteration i does not depend on where training started
        g = torch.Generator().manual_seed(i)
        batch = (
            torch.randn(2, 3, 32, 32, generator=g),
            torch.randint(0, 5, (2, 32, 32), generator=g),
        )
        train_steps(model, [batch], optimizer, scheduler, segmentation_loss, device)
    cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
    return TrainState(
        model.state_dict(),
        optimizer.state_dict(),
        scheduler.state_dict(),
        0,
        0,
        iterations.stop,
        [torch.get_rng_state()],
        cuda,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_resumed_training_equals_uninterrupted_bitwise(tmp_path: Path, device: str) -> None:
    """3 iterations, a checkpoint through the files, 3 more == 6 in one go: weights, optimizer
    momentum, schedule, and the dropout RNG (CPU and CUDA). On CUDA with cuDNN deterministic."""
    dev = torch.device(device)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    straight = _train(dev, range(6), None)
    half = _train(dev, range(3), None)
    folder = tmp_path / "checkpoint_000"
    folder.mkdir()
    save_checkpoint(folder, half, History(), 6)
    found = load_latest(None, str(tmp_path), dev)
    assert found is not None
    loaded = found[0]
    loaded.rng = [r.cpu() for r in loaded.rng]
    loaded.cuda_rng = [r.cpu() for r in loaded.cuda_rng]
    resumed = _train(dev, range(3, 6), loaded)
    for key, value in straight.model.items():
        assert torch.equal(value, resumed.model[key]), key
    assert resumed.scheduler["last_epoch"] == straight.scheduler["last_epoch"] == 6
