"""Ray Train on CPU: a 2-worker run, resume == uninterrupted, worker-kill recovery, bad input."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.artifacts.refs import load_model
from pipeline.cli import app
from pipeline.config import ConfigError
from pipeline.errors import DataError, TrainingError
from pipeline.sections import DataParams, MlflowParams, ModelParams, TrainParams
from pipeline.training.checkpoint import TrainState
from pipeline.training.driver import run_training
from pipeline.training.job import prepare_job
from pipeline.training.results import RunSummary
from tests.conftest import latest_state, stop_after_checkpoints, synthetic_shards, tiny_params

runner = CliRunner()
Configs = tuple[ModelParams, DataParams, TrainParams, MlflowParams]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_shards(
        tmp_path_factory.mktemp("train") / "shards", 12, 4, max_count=5
    )  # 5 + 5 + 2


def configs(shards: Path, tmp: Path, **train: object) -> Configs:
    """Two workers, 3 epochs of 3 iterations (tests.conftest.tiny_params otherwise)."""
    values: dict[str, object] = {
        "batch_size": 4,  # 2 per worker
        "epochs": 3,
        "iters_per_epoch": 3,
        "log_every": 3,
        "num_workers": 2,
        "seed": 3,
    }
    return tiny_params(tmp, shards, train={**values, **train}, mlflow={"num_prediction_images": 2})


def assert_same_weights(a: TrainState, b: TrainState) -> None:
    for name, value in b.model.items():
        assert torch.equal(a.model[name], value), name


@pytest.fixture(scope="module")
def uninterrupted(
    shards: Path, tmp_path_factory: pytest.TempPathFactory, ray_cluster: None
) -> tuple[Path, RunSummary]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return tmp, run_training(*configs(shards, tmp, run_name="reference"))


@pytest.mark.slow
def test_two_worker_run_learns_and_writes_outputs(uninterrupted: tuple[Path, RunSummary]) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    tmp, summary = uninterrupted
    out = tmp / "out"
    assert {p.name for p in out.iterdir()} >= {
        "model.pt",
        "metrics.json",
        "train_curve.csv",
        "val_curve.csv",
        "per_class_iou.csv",
        "confusion_matrix.png",
        "val_predictions.png",
        "curves.png",
    }
    assert json.loads((out / "metrics.json").read_text()) == dataclasses.asdict(summary)
    with open(out / "val_curve.csv") as f:  # the best of the evaluations, as they were logged
        curve = [float(row["miou"]) for row in csv.DictReader(f)]
    assert len(curve) == 3 and summary.best["val_miou"] == pytest.approx(max(curve), abs=1e-5)
    with open(out / "train_curve.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 3 and losses[-1] < losses[0]  # one log line per epoch; the loss went down
    state = latest_state(tmp / "ray", "reference")
    assert (state.iteration, state.epoch, state.batch, len(state.rng)) == (9, 3, 0, 2)

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert (
        run.data.params["train.lr"] == "0.01" and run.data.params["model.backbone"] == "resnet18d"
    )
    assert len(client.get_metric_history(run.info.run_id, "val/miou")) == 3
    names = {"loss/total", "loss/output/pam", "lr", "lr_head", "images_per_s", "val/mean_acc"}
    assert names <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts >= {"confusion_matrix.png", "val_predictions.png", "curves.png"}
    # pictures are files (one click under Artifacts), not MLflow images: MLflow's image card
    # shows every param of the run above the picture
    assert not [a for a in artifacts if a.startswith("images")]
    assert {"val_attention_pam.png", "val_attention_cam.png"} <= artifacts  # the last evaluation
    evaluations = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "evaluations")}
    predictions = {n for n in evaluations if n.startswith("val_predictions_")}
    assert predictions == {f"val_predictions_{i:06d}.png" for i in (0, 3, 6, 9)}  # untrained, then
    assert {f"per_class_iou_{i:06d}.png" for i in (3, 6, 9)} <= evaluations  # every evaluation

    # the weights are a plain artifact of the run (the served pyfunc is danet register's)
    assert "model.pt" in artifacts
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    assert not mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list"
    )
    loaded = load_model(run.info.run_id, f"sqlite:///{tmp / 'mlflow.db'}")
    assert loaded.uri == f"runs:/{run.info.run_id}/model.pt"
    assert loaded.classes[3] == "Road" and len(loaded.palette) == 11
    with torch.no_grad():  # the raw module behind the served model: any input size
        assert loaded.module(torch.rand(1, 3, 37, 53)).shape == (1, 11, 37, 53)


@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted(
    shards: Path, tmp_path: Path, uninterrupted: tuple[Path, RunSummary]
) -> None:
    """A worker dies at the start of epoch 2 (after the epoch-1 checkpoint), no retries; start again."""
    cfg = configs(shards, tmp_path, run_name="interrupted")
    with pytest.raises(TrainingError, match=r"training failed after train.max_failures retries"):
        run_training(*cfg, fault=(2, 0, str(tmp_path / "crashed")))
    assert latest_state(tmp_path / "ray", "interrupted").epoch == 2  # epoch 2 not started
    run_training(*cfg)  # the same name: resumes from the epoch-1 checkpoint
    resumed = latest_state(tmp_path / "ray", "interrupted")
    reference = latest_state(uninterrupted[0] / "ray", "reference")
    assert resumed.iteration == reference.iteration == 9
    assert_same_weights(resumed, reference)


@pytest.mark.slow
def test_worker_killed_mid_run_recovers(
    shards: Path, tmp_path: Path, uninterrupted: tuple[Path, RunSummary]
) -> None:
    """Rank 1's process dies in epoch 2; FailureConfig restarts the group from the checkpoint."""
    cfg = configs(shards, tmp_path, run_name="killed", max_failures=1)
    summary = run_training(*cfg, fault=(2, 1, str(tmp_path / "crashed")))
    assert (tmp_path / "crashed").exists()
    recovered = latest_state(tmp_path / "ray", "killed")
    assert recovered.iteration == 9 and summary.final["iteration"] == 9
    assert_same_weights(recovered, latest_state(uninterrupted[0] / "ray", "reference"))


# --- bad input: one line, before any work --------------------------------------------------


def test_missing_shards(tmp_path: Path) -> None:
    model, data, train, _ = configs(tmp_path / "nowhere", tmp_path)
    with pytest.raises(DataError, match="shard manifest does not exist"):
        prepare_job(model, data, train)


def test_classes_mismatch_and_bad_params(shards: Path, tmp_path: Path) -> None:
    model, data, train, _ = configs(shards, tmp_path)
    with pytest.raises(
        ConfigError,
        match=re.escape("model.num_classes is 19 but the shard manifest has 11 classes"),
    ):
        prepare_job(ModelParams(num_classes=19), data, train)
    with pytest.raises(ConfigError, match=re.escape("model.backbone 'resnet7' is unknown")):
        prepare_job(ModelParams(backbone="resnet7"), data, train)
    with pytest.raises(ConfigError, match=re.escape("data.crop_size 512 is larger than any crop")):
        prepare_job(model, DataParams(shards=str(shards), crop_size=512), train)
    with pytest.raises(ConfigError, match=re.escape("train.lr must be > 0, got -0.1")):
        TrainParams(lr=-0.1)


def test_truncated_or_missing_shard(shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    (copy / "val-000000.tar").write_bytes(b"")
    model, data, train, _ = configs(copy, tmp_path)
    with pytest.raises(
        DataError, match=r"val-000000\.tar: shard has 0 bytes, the manifest says \d+"
    ):
        prepare_job(model, data, train)
    (copy / "val-000000.tar").unlink()
    with pytest.raises(DataError, match=r"val-000000\.tar: shard is missing"):
        prepare_job(model, data, train)


def _cli(tmp_path: Path, shards: Path, extra: str = "") -> list[str]:
    params = tmp_path / "params.yaml"
    params.write_text(
        f"data: {{shards: {shards}, crop_size: 32}}\ntrain: {{out: {tmp_path / 'o'}}}\n{extra}"
    )
    return ["train", "--params", str(params)]


def test_cli_unreachable_ray_and_mlflow(shards: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, [*_cli(tmp_path, shards), "--address", "127.0.0.1:9"])
    assert result.exit_code == 2
    assert (
        result.output.strip()
        .splitlines()[-1]
        .startswith("error: train.ray_address '127.0.0.1:9': cannot connect to Ray")
    )
    result = runner.invoke(
        app, _cli(tmp_path, shards, "mlflow: {tracking_uri: 'http://127.0.0.1:9'}\n")
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "error: mlflow.tracking_uri http://127.0.0.1:9: server unreachable (ConnectionError)"
    )
    assert not (tmp_path / "o").exists()


# --- run identity: a finished run is reused, new code trains anew, --restart ------------------


def count_runs(tmp: Path) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))


@pytest.mark.slow
def test_finished_run_is_reused_new_code_retrains_and_restart_starts_anew(
    shards: Path, tmp_path: Path, ray_cluster: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.training.job as job_module

    cfg = configs(shards, tmp_path, epochs=1, iters_per_epoch=2, num_workers=1, batch_size=2)
    first = run_training(*cfg)  # run_name "": named after its identity
    checkpoints = sorted((tmp_path / "ray" / first.run_name).glob("checkpoint_*"))
    again = run_training(*cfg)  # finished: reused, not resumed into a no-op
    assert again == first and count_runs(tmp_path) == 1
    assert sorted((tmp_path / "ray" / first.run_name).glob("checkpoint_*")) == checkpoints

    monkeypatch.setattr(job_module, "code_digest", lambda: "a line of danet/ changed")
    changed = run_training(*cfg)  # another identity: a new run that trains
    assert changed.run_name != first.run_name and count_runs(tmp_path) == 2
    assert latest_state(tmp_path / "ray", changed.run_name).iteration == 2

    restarted = run_training(*cfg, restart=True)  # the same identity, trained anew
    assert restarted.run_name == changed.run_name and count_runs(tmp_path) == 3
    assert latest_state(tmp_path / "ray", changed.run_name).iteration == 2


def train_command(tmp: Path, shards: Path, **train: object) -> list[str]:
    """``danet train`` of tiny_params with a checkpoint per iteration, as a params file."""
    values = {
        "epochs": 6,
        "eval_every_epochs": 3,
        "log_every": 1,
        "checkpoint_every": 1,
        "checkpoints_to_keep": 2,
        "run_name": "signals",
        **train,
    }
    model, data, train_params, mlflow = tiny_params(tmp, shards, train=values)
    params = {
        "model": dataclasses.asdict(model),
        "data": dataclasses.asdict(data),
        "train": dataclasses.asdict(train_params),
        "mlflow": dataclasses.asdict(mlflow),
    }
    (tmp / "params.yaml").write_text(json.dumps(params))
    return [
        str(Path(sys.executable).parent / "danet"),
        "train",
        "--params",
        str(tmp / "params.yaml"),
    ]


@pytest.mark.slow
def test_interrupted_train_resumes_where_it_stopped(shards: Path, tmp_path: Path) -> None:
    """The driver stopped by SIGTERM, then (resumed) killed by SIGKILL; each time the same
    command continues from the last checkpoint (not iteration 1), and at most
    checkpoints_to_keep remain at the end. (Ctrl-C unwinds through the same exit as SIGTERM;
    tests/test_tune.py stops a search with SIGINT, tests/test_bad_inputs.py a shard.)"""
    command = train_command(tmp_path, shards, epochs=6)  # 12 iterations, a checkpoint each
    stopped = 0
    for sig in (signal.SIGTERM, signal.SIGKILL):
        stopped = stop_after_checkpoints(command, tmp_path, sig, more=2)
        assert stopped < 12, f"the run finished before {sig.name}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    resumed = re.search(r"resumed at iteration (\d+)", done.stdout + done.stderr)
    assert resumed and int(resumed.group(1)) >= stopped - 1, (done.stdout + done.stderr)[-3000:]
    assert latest_state(tmp_path / "ray", "signals").iteration == 12
    run_dir = tmp_path / "ray" / "signals"
    assert len([d for d in run_dir.glob("checkpoint_*") if d.is_dir()]) <= 2
