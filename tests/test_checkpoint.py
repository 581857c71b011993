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
