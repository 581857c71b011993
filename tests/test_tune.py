"""Ray Tune on CPU with tiny data: 3 trials, ASHA stops one, the best is chosen by val mIoU."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    ConfigError,
    DataParams,
    MlflowParams,
    ModelParams,
    TrainParams,
    TuneParams,
    load_params,
)
from pipeline.training.search import run_search
from pipeline.training.search_summary import Trial, format_trials, write_summary
from tests.conftest import synthetic_shards, tiny_params


def configs(tmp: Path) -> tuple[ModelParams, DataParams, TrainParams, MlflowParams, TuneParams]:
    shards = tmp / "shards"
    if not shards.exists():
        synthetic_shards(shards, 8, 4, max_count=4)
    train = {"cpus_per_worker": 2, "out": str(tmp / "train")}
    return (
        *tiny_params(tmp, shards, train=train),
        TuneParams(
            lr_min=1e-4,
            lr_max=0.05,
            crop_sizes=(32, 48),
            num_samples=3,
            max_concurrent=1,
            epochs=3,
            grace_period=1,
            reduction_factor=2,
            seed=1,
            out=str(tmp / "tune"),
        ),
    )


@pytest.mark.slow
def test_search_stops_one_trial_early_and_keeps_the_best(tmp_path: Path, ray_cluster: None) -> None:
    cfg = configs(tmp_path)
    summary = run_search(*cfg)
    trials = summary.trials
    assert len(trials) == 3
    assert all(not t.error for t in trials)
    assert any(t.stopped_early for t in trials), format_trials(trials, summary.best)
    assert any(t.evaluations == 3 for t in trials)
    best = max(trials, key=lambda t: t.best_val_miou)
    assert summary.best.trial_id == best.trial_id
    assert math.isclose(summary.best_metrics.best["val_miou"], best.best_val_miou)

    out = tmp_path / "tune"
    params = yaml.safe_load((out / "best_params.yaml").read_text())
    loaded = load_params(out / "best_params.yaml")  # a params file of its own: --params takes it
    assert (loaded.train.lr, loaded.data.crop_size) == (params["train"]["lr"], best.crop_size)
    assert params["train"]["lr"] == pytest.approx(best.lr, rel=1e-5)
    assert params["data"]["crop_size"] == best.crop_size in (32, 48)
    assert (out / "model.pt").is_file() and (out / "metrics.json").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg[3].tracking_uri)
    parent = client.get_run(summary.mlflow_parent_run_id)
    assert parent.data.metrics["best_val_miou"] == pytest.approx(best.best_val_miou)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 3
    stopped = [c for c in children if c.data.tags.get("tune.stopped_early") == "true"]
    assert stopped and all(c.info.status == "KILLED" for c in stopped)
    assert all("val_miou" in c.data.metrics for c in children)

    # Started again with the same config: Tuner.restore finds the finished search, trains nothing.
    again = run_search(*cfg)
    assert [t.trial_id for t in again.trials] == [t.trial_id for t in trials]
    assert again.best == summary.best


def test_bad_search_params_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tune.lr_min/lr_max must satisfy min <= max"):
        TuneParams(lr_min=0.1, lr_max=0.01)
    with pytest.raises(ConfigError, match=r"tune.crop_sizes\[0\] must be >= 16"):
        TuneParams(crop_sizes=(8,))
    model, data, train, tracking, tune = configs(tmp_path)
    import dataclasses

    with pytest.raises(
        ConfigError, match=r"tune.crop_sizes: data.crop_size 512 is larger than any crop"
    ):
        run_search(model, data, train, tracking, dataclasses.replace(tune, crop_sizes=(32, 512)))


def test_trials_take_the_search_cadence_and_cpus() -> None:
    from pipeline.training.trial import trial_train

    train = TrainParams(epochs=20, eval_every_epochs=5, cpus_per_worker=2)
    given = trial_train(train, TuneParams(epochs=4, eval_every_epochs=2, cpus_per_trial=1))
    assert (given.epochs, given.eval_every_epochs, given.cpus_per_worker) == (4, 2, 1)
    default = trial_train(train, TuneParams(epochs=4, eval_every_epochs=0, cpus_per_trial=0))
    assert (default.epochs, default.eval_every_epochs, default.cpus_per_worker) == (4, 5, 2)


@pytest.mark.slow
def test_ctrl_c_stops_a_search_in_seconds_and_it_then_resumes(tmp_path: Path) -> None:
    """``danet tune`` stopped by Ctrl-C (SIGINT) mid-trial exits 130 within 15 s with no
    traceback of its own and no result written (Tune's own handler returned the unfinished
    trials as the search's result); the same command then resumes the search and finishes it.
    SIGTERM takes the same path (the CLI's handler unwinds like Ctrl-C; tests/test_train.py)."""
    synthetic_shards(tmp_path / "shards", 8, 4, max_count=4)
    params = {
        "model": {"backbone": "resnet18d"},
        "data": {"shards": "shards", "crop_size": 32, "shuffle_buffer": 4},
        "train": {
            "batch_size": 2,
            "iters_per_epoch": 2,
            "eval_every_epochs": 1,
            "log_every": 2,
            "checkpoint_every": 1,
            "cpus_per_worker": 1,
            "max_failures": 0,
            "storage_path": "ray",
            "out": "train",
        },
        "mlflow": {"tracking_uri": "sqlite:///mlflow.db", "num_prediction_images": 1},
        "tune": {"crop_sizes": [32], "num_samples": 1, "max_concurrent": 1, "epochs": 3},
    }
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    command = [str(Path(sys.executable).parent / "danet"), "tune", "--set", "tune.out=tune"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "tune.log"
    with open(log, "w") as output:  # a file: a full pipe would block the driver
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 300
        while not list((tmp_path / "ray").rglob("checkpoint_*")):  # the trial is training
            alive = process.poll() is None and time.monotonic() < deadline
            assert alive, log.read_text()[-3000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        process.wait(timeout=60)
    took, text = time.monotonic() - sent, log.read_text()
    # the driver's own lines: Ray prefixes its actors' logs with "(Name pid=...)"
    ours = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if line[:1] != "("]
    assert process.returncode == 130 and not any("Traceback" in line for line in ours), text
    assert took < 15, f"{took:.1f} s to stop after Ctrl-C"
    assert not (tmp_path / "tune").exists(), "a stopped search wrote a result"

    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    text = done.stdout + done.stderr
    assert done.returncode == 0 and "resuming search" in text, text[-3000:]
    trials = json.loads((tmp_path / "tune" / "trials.json").read_text())
    # finished without error; how many evaluations the summary counts after a resume depends on
    # where Ctrl-C fell (2 or 3 seen): the history Tune returns for a restored trial, open
    assert len(trials) == 1 and trials[0]["evaluations"] >= 2 and not trials[0]["error"], trials
    assert (tmp_path / "tune" / "model.pt").is_file()


def test_best_params_is_a_params_file(tmp_path: Path) -> None:
    """best_params.yaml loads as params (``danet train --params``); the trial and its score
    are comments."""
    best = Trial("1", "s-trial-1", 0.0123456789, 48, 2, 0.5, False, "", "checkpoint_0")
    write_summary(tmp_path, best, [best])
    text = (tmp_path / "best_params.yaml").read_text()
    loaded = load_params(tmp_path / "best_params.yaml")
    assert (loaded.train.lr, loaded.data.crop_size) == (0.0123457, 48)
    assert text.startswith("# the best trial of the search: s-trial-1, val mIoU 0.500000\n")
    assert json.loads((tmp_path / "trials.json").read_text())[0]["lr"] == 0.0123456789
