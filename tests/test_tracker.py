"""Rank 0's MLflow reporting without a server: a fake client that goes down and comes back."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.training.records import History, StepRecord
from pipeline.training.tracker import Tracker


class FlakyClient:
    def __init__(self) -> None:
        self.down = False
        self.sent: list[tuple[str, int]] = []

    def log_batch(self, run_id: str, metrics: list[Any]) -> None:
        assert run_id == "run-1"
        if self.down:
            raise ConnectionError("Connection refused")
        self.sent += [(m.key, m.step) for m in metrics]


def test_metrics_survive_mlflow_going_down(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    job: Any = SimpleNamespace(
        tracking_uri="", mlflow_run_id="run-1", train=SimpleNamespace(max_iters=10)
    )
    tracker = Tracker(job, History())
    tracker.client = client = FlakyClient()
    clock = [100.0]
    monkeypatch.setattr("pipeline.training.tracker.time.monotonic", lambda: clock[0])

    def step(i: int) -> None:
        tracker.step(StepRecord(iteration=i, loss=1.0 / i, lr=0.01, images_per_s=5.0))

    step(1)
    assert ("loss/total", 1) in client.sent and not tracker.buffer
    client.down = True
    with caplog.at_level(logging.WARNING):
        step(2)
        clock[0] += 1
        step(3)  # within RETRY_S of the failure: buffered, not tried
    warnings = [r for r in caplog.records if "MLflow unreachable" in r.getMessage()]
    assert len(warnings) == 1 and len(tracker.buffer) == 8  # loss, lr, lr_head, images_per_s x 2
    client.down = False
    clock[0] += Tracker.RETRY_S
    step(4)
    assert not tracker.buffer and tracker.down_since is None
    assert [s for k, s in client.sent if k == "loss/total"] == [1, 2, 3, 4]  # none lost, none twice
    assert [r.iteration for r in tracker.history.steps] == [1, 2, 3, 4]


def test_an_evaluation_keeps_its_reported_names_and_old_checkpoints_read() -> None:
    """metrics.json of train.out names the scores as Ray, Tune and MLflow get them (val_miou);
    a history.json written before the record's fields were renamed still loads."""
    from pipeline.training.records import EvalRecord, History
    from pipeline.training.results import _scores

    e = EvalRecord(
        1, 10, miou=0.5, pixel_acc=0.8, mean_acc=0.6, train_loss=1.0, iou_per_class=[0.5]
    )
    assert _scores(e) == {
        "val_miou": 0.5,
        "val_pixel_acc": 0.8,
        "val_mean_acc": 0.6,
        "epoch": 1,
        "iteration": 10,
    }
    old = '{"steps": [], "evals": [{"epoch": 1, "iteration": 10, "val_miou": 0.5, "val_pixel_acc": 0.8, "val_mean_acc": 0.6, "train_loss": 1.0, "iou_per_class": [0.5]}]}'
    assert History.from_json(old).evals == [e]
    assert History.from_json(History([], [e]).to_json()).best() == e


def test_lineage_is_dirty_for_code_not_for_the_lock_file_dvc_rewrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    from pipeline.codebase import git_state

    for name in ("dvc.lock", "train.py"):
        (tmp_path / name).write_text("v1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "one"]):
        subprocess.run([*git, *args], cwd=tmp_path, check=True, capture_output=True)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    (tmp_path / "dvc.lock").write_text("v2\n")  # dvc repro wrote its results
    commit, dirty = git_state()
    assert len(commit) == 40 and not dirty
    (tmp_path / "train.py").write_text("v2\n")  # the code differs from the commit
    assert git_state() == (commit, True)
