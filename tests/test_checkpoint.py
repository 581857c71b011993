"""Checkpoint files without Ray Train: which checkpoint a run resumes from, and what is pruned."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.training.checkpoint import (
    TrainState,
    checkpoint_dirs,
    finished_checkpoint,
    load_checkpoint,
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


class Stop(Exception):
    """Ends a session at a report, as a killed worker would after its checkpoint."""


def _session(
    shards: Path,
    out: Path,
    device: str,
    start: Path | None = None,
    stop_at: int = 0,
    recipe: dict[str, Any] | None = None,
) -> tuple[Any, list[Path]]:
    """The training session of a tiny job (2 epochs of 2 iterations, an evaluation each) from the
    checkpoint ``start``; every report writes a checkpoint into ``out``; ``stop_at`` > 0 stops
    after that many reports."""
    from pipeline.training.job import prepare_job
    from pipeline.training.session import open_session, restore, snapshot, train_epochs
    from tests.conftest import tiny_params

    model, data, train, _ = tiny_params(out, shards, train=recipe or {})
    job = prepare_job(model, data, train)
    run = open_session(job, device=torch.device(device))
    if start is not None:
        restore(run, *load_checkpoint(start, run.device))
    written: list[Path] = []

    def report(session: Any, metrics: dict[str, float]) -> None:
        folder = out / f"checkpoint_{session.iteration:03d}"
        folder.mkdir(parents=True)
        cuda = [torch.cuda.get_rng_state(run.device)] if run.device.type == "cuda" else []
        save_checkpoint(folder, snapshot(session, cuda_rng=cuda), session.history, 4)
        written.append(folder)
        if len(written) == stop_at:
            raise Stop

    with contextlib.suppress(Stop):
        train_epochs(run, None, report)
    return run, written


@pytest.mark.parametrize("device", DEVICES)
def test_resumed_training_equals_uninterrupted_bitwise(
    tiny_shards: Path, tmp_path: Path, device: str
) -> None:
    """The Ray-free training session (the one the Ray worker drives), stopped after its first
    checkpoint and resumed from the file, equals one run straight through: weights, optimizer
    momentum, schedule, the data stream's position and the dropout RNG (CPU and CUDA; on CUDA
    with cuDNN deterministic)."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    straight, _ = _session(tiny_shards, tmp_path / "straight", device)
    _, written = _session(tiny_shards, tmp_path / "stopped", device, stop_at=1)
    assert [p.name for p in written] == ["checkpoint_002"]
    resumed, _ = _session(tiny_shards, tmp_path / "resumed", device, start=written[0])
    for key, value in straight.core.state_dict().items():
        assert torch.equal(value, resumed.core.state_dict()[key]), key
    assert resumed.iteration == straight.iteration == 4 and resumed.epoch == straight.epoch == 2
    assert resumed.history.evals == straight.history.evals and len(straight.history.evals) == 2
    assert resumed.best is not None and resumed.best.miou == straight.history.best().miou


def test_fp16_with_accumulation_resumes_on_a_step_boundary_with_its_scale(
    tiny_shards: Path, tmp_path: Path
) -> None:
    """fp16 loss scaling and 2 micro-batches per step: stopped after the first checkpoint and
    resumed, the run equals one straight through (the scaler's state is in the checkpoint, the
    data stream resumes at the step's first micro-batch)."""
    recipe = {"precision": "fp16", "accumulate": 2, "batch_size": 2}
    straight, _ = _session(tiny_shards, tmp_path / "straight", "cpu", recipe=recipe)
    _, written = _session(tiny_shards, tmp_path / "stopped", "cpu", stop_at=1, recipe=recipe)
    state, _ = load_checkpoint(written[0])
    assert state.iteration == 2 and state.scaler and state.scaler["scale"] > 0
    resumed, _ = _session(tiny_shards, tmp_path / "resumed", "cpu", written[0], recipe=recipe)
    for key, value in straight.core.state_dict().items():
        assert torch.equal(value, resumed.core.state_dict()[key]), key
    assert resumed.iteration == straight.iteration == 4
    assert resumed.scaler.state_dict() == straight.scaler.state_dict()


class _Payload:
    """A pickle that carries code: unpickling it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize(
    ("damage", "file", "problem"),
    [
        ("state missing", "state.pt", "missing"),
        ("state truncated", "state.pt", "not a checkpoint that loads"),
        ("state carries code", "state.pt", "not a checkpoint that loads"),
        ("state of another program", "state.pt", "not a checkpoint that loads"),
        ("history missing", "history.json", "missing"),
        ("history truncated", "history.json", "not a run's history"),
        ("history foreign", "history.json", "not a run's history"),
    ],
)
def test_a_damaged_checkpoint_is_one_line_naming_the_file(
    tmp_path: Path, damage: str, file: str, problem: str
) -> None:
    """Issue 35 item 6: state.pt / history.json missing, truncated, carrying code or written by
    something else -> a ``DataError`` naming the file and how to start over; nothing runs."""
    from pipeline.errors import DataError

    folder = write(tmp_path / "run", "01", 10, max_iters=10)
    target, marker = folder / file, tmp_path / "ran"
    if damage.endswith("missing"):
        target.unlink()
    elif damage.endswith("truncated"):
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    elif damage == "state carries code":
        torch.save({"model": _Payload(marker)}, target)
    elif damage == "state of another program":
        torch.save({"weights": torch.zeros(2)}, target)
    else:
        target.write_text('{"steps": [{"loss": "x", "extra": 1}]}')
    with pytest.raises(DataError) as raised:
        load_checkpoint(folder)
    message = str(raised.value)
    assert message.startswith(f"{target}: {problem}") and "--restart" in message, message
    assert "\n" not in message and not marker.exists()


def test_a_foreign_progress_file_is_not_a_finished_run(tmp_path: Path) -> None:
    folder = write(tmp_path / "run", "01", 10, max_iters=10)
    assert finished_checkpoint(str(tmp_path / "run")) is not None
    for text in ('{"iteration": "ten"}', "[1, 2]", '{"max_iters": 10}', "{"):
        (folder / "progress.json").write_text(text)
        assert finished_checkpoint(str(tmp_path / "run")) is None, text
