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
from typing import Any

import pytest
import yaml

from pipeline.config import ConfigError, load_params
from pipeline.sections import DataParams, MlflowParams, ModelParams, TrainParams, TuneParams
from pipeline.training.search import run_search
from pipeline.training.search_summary import Trial, format_trials, write_summary
from tests.conftest import synthetic_shards, takes_ctrl_c, tiny_params


def configs(tmp: Path) -> tuple[ModelParams, DataParams, TrainParams, MlflowParams, TuneParams]:
    shards = tmp / "shards"
    if not shards.exists():
        synthetic_shards(shards, 8, 4, max_count=4)
    train = {"cpus_per_worker": 2, "out": str(tmp / "train")}
    return (
        *tiny_params(tmp, shards, train=train),
        TuneParams(
            space={
                "train.lr": {"loguniform": [1e-4, 0.05]},
                "data.crop_size": {"choice": [32, 48]},
            },
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
    crop = best.values["data.crop_size"]
    assert (loaded.train.lr, loaded.data.crop_size) == (params["train"]["lr"], crop)
    assert params["train"]["lr"] == pytest.approx(best.values["train.lr"], rel=1e-5)
    assert params["data"]["crop_size"] == crop in (32, 48)
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
    assert stopped and all(c.info.status == "FINISHED" for c in stopped)  # not shown as crashed
    assert all("val/miou" in c.data.metrics for c in children)
    # the view the search's description links: the runs table filtered to these trials
    from pipeline.notes import SHARED_VIEW, trials_view_link

    experiment = client.get_experiment(parent.info.experiment_id)
    view = json.loads(experiment.tags[SHARED_VIEW + summary.search])
    found = client.search_runs([parent.info.experiment_id], view["searchFilter"])
    assert {r.info.run_id for r in found} == {c.info.run_id for c in children}
    link = trials_view_link(parent.info.experiment_id, summary.search)
    assert link in parent.data.tags["mlflow.note.content"]

    # Started again with the same config: Tuner.restore finds the finished search, trains nothing.
    again = run_search(*cfg)
    assert [t.trial_id for t in again.trials] == [t.trial_id for t in trials]
    assert again.best == summary.best


@pytest.mark.slow
def test_an_optuna_search_over_lr_and_weight_decay_runs_and_resumes(
    tmp_path: Path, ray_cluster: None
) -> None:
    """tune.search_alg optuna (TPE, seeded) over two params of the recipe, no early stopping:
    each trial trains with its draw (its MLflow run's params say so), best_params.yaml holds
    the winner's values, and the same search started again is restored, not rerun."""
    import dataclasses

    from mlflow.tracking import MlflowClient

    model, data, train, tracking, tune = configs(tmp_path)
    space = {
        "train.lr": {"loguniform": [1e-3, 0.05]},
        "train.weight_decay": {"loguniform": [1e-5, 1e-3]},
    }
    tune = dataclasses.replace(
        tune, space=space, search_alg="optuna", scheduler="none", num_samples=2, epochs=1
    )
    summary = run_search(model, data, train, tracking, tune)
    trials = summary.trials
    assert len(trials) == 2 and not any(t.error or t.stopped_early for t in trials), trials
    for t in trials:
        assert set(t.values) == set(space) and t.evaluations == 1
        assert 1e-3 <= t.values["train.lr"] <= 0.05
        assert 1e-5 <= t.values["train.weight_decay"] <= 1e-3
    assert trials[0].values != trials[1].values
    loaded = load_params(tmp_path / "tune" / "best_params.yaml")
    best = summary.best.values
    assert loaded.train.weight_decay == pytest.approx(best["train.weight_decay"], rel=1e-5)
    assert loaded.train.lr == pytest.approx(best["train.lr"], rel=1e-5)

    client = MlflowClient(tracking.tracking_uri)
    parent = client.get_run(summary.mlflow_parent_run_id)
    assert parent.data.params["tune.search_alg"] == "optuna"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    drawn = {float(c.data.params["train.weight_decay"]) for c in children}
    assert drawn == {t.values["train.weight_decay"] for t in trials}

    again = run_search(model, data, train, tracking, tune)
    assert [t.values for t in again.trials] == [t.values for t in trials]


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({}, r"tune.space must name at least one params key"),
        ({"train.lr": {"loguniform": [0.1, 0.01]}}, r"tune.space.train.lr.loguniform must be \[low, high\]"),
        ({"train.lr": {"loguniform": [0, 0.01]}}, r"low > 0 <= high, got \[0, 0.01\]"),
        ({"train.lr": {"normal": [0, 1]}}, r"tune.space.train.lr must be one of \{loguniform \| uniform"),
        ({"train.lr": [0.01, 0.02]}, r"tune.space.train.lr must be a mapping"),
        ({"train.warmup": {"choice": [1]}}, r"tune.space.train.warmup: train.warmup is not a known param"),
        ({"lr": {"choice": [1]}}, r"tune.space.lr: not a params key a trial can change"),
        ({"evaluate.flip": {"choice": [True]}}, r"tune.space.evaluate.flip: not a params key"),
        ({"model.backbone": {"choice": ["resnet50d"]}}, r"holds model.backbone fixed \(the trials start"),
        ({"train.epochs": {"choice": [3]}}, r"tune.epochs and tune.eval_every_epochs set"),
        ({"data.crop_size": {"randint": [32.5, 48]}}, r"randint must be \[low, high\], two integers"),
        ({"data.crop_size": {"choice": []}}, r"tune.space.data.crop_size.choice must be a non-empty list"),
    ],
)  # fmt: skip
def test_a_bad_search_space_is_one_line(space: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TuneParams(space=space)


def test_old_search_keys_name_the_new_one(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("tune: {lr_min: 0.001}\n")
    with pytest.raises(ConfigError, match=r"^tune.lr_min is gone: use tune.space, e.g. \{train.lr"):
        load_params(tmp_path / "p.yaml")


def test_grid_needs_the_random_searcher() -> None:
    with pytest.raises(ConfigError, match=r"grid is for tune.search_alg random"):
        TuneParams(space={"train.lr": {"grid": [0.01]}}, search_alg="optuna")


def test_values_a_trial_could_draw_are_checked_against_the_params(tmp_path: Path) -> None:
    """Every choice and both ends of a range, set on the real params before any trial runs: a
    value of the wrong type, outside a param's rule or a crop the loader cannot cut."""
    model, data, train, tracking, tune = configs(tmp_path)
    import dataclasses

    cases: list[tuple[dict[str, Any], str]] = [
        ({"data.crop_size": {"choice": [32, 512]}}, r"tune.space.data.crop_size 512: data.crop_size 512 is larger than any crop"),
        ({"data.crop_size": {"uniform": [32, 48]}}, r"tune.space.data.crop_size 32.0: data.crop_size must be an integer, got 32.0"),
        ({"train.momentum": {"uniform": [0.5, 1.5]}}, r"tune.space.train.momentum 1.5: train.momentum must be < 1"),
        ({"train.loss": {"choice": ["ce", "dice"]}}, r"tune.space.train.loss 'dice': train.loss must be one of ce \| ohem"),
        ({"train.loss_weights.pam": {"uniform": [-1, 1]}}, r"train.loss_weights.pam must be >= 0, got -1"),
    ]  # fmt: skip
    for space, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_search(model, data, train, tracking, dataclasses.replace(tune, space=space))


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
        "tune": {
            "space": {"data.crop_size": {"choice": [32]}},
            "num_samples": 1,
            "max_concurrent": 1,
            "epochs": 3,
        },
    }
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    command = [str(Path(sys.executable).parent / "danet"), "tune", "--set", "tune.out=tune"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "tune.log"
    with open(log, "w") as output:  # a file: a full pipe would block the driver
        process = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=takes_ctrl_c,
        )
        deadline = time.monotonic() + 300
        while not list((tmp_path / "ray").rglob("checkpoint_*")):  # the trial is training
            alive = process.poll() is None and time.monotonic() < deadline
            assert alive, log.read_text()[-3000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)  # a hang fails here; how fast it stops is no assertion
    text = log.read_text()
    # the driver's own lines: Ray prefixes its actors' logs with "(Name pid=...)"
    ours = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if line[:1] != "("]
    assert process.returncode == 130 and not any("Traceback" in line for line in ours), text
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
    values = {"train.lr": 0.0123456789, "data.crop_size": 48, "train.loss_weights.pam": 0.5}
    best = Trial("1", "s-trial-1", values, 2, 0.5, False, "", "checkpoint_0")
    from pipeline.training.trial import SearchJob, trial_job

    model, data, train, _, _ = configs(tmp_path)
    from pipeline.training.job import prepare_job

    search = SearchJob(prepare_job(model, data, train), "s", str(tmp_path), "e", "", {})
    write_summary(tmp_path, best, [best], trial_job(search, values))
    text = (tmp_path / "best_params.yaml").read_text()
    loaded = load_params(tmp_path / "best_params.yaml")
    assert (loaded.train.lr, loaded.data.crop_size) == (0.0123456789, 48)  # exact, not rounded
    assert loaded.train.loss_weights["pam"] == 0.5 and loaded.train.loss_weights["out"] == 1.0
    assert text.startswith("# the best trial of the search: s-trial-1, val mIoU 0.500000\n")
    assert json.loads((tmp_path / "trials.json").read_text())[0]["values"] == values


def test_refit_trains_the_searchs_best_params_over_params_yaml(tmp_path: Path) -> None:
    """``danet train --refit tune.out``: best_params.yaml over the params file, ``--set`` over
    both; the run's tags name the search, its MLflow run and the trial."""
    from pipeline.training.search_summary import read_refit

    values = {"train.lr": 0.0123, "data.crop_size": 48}
    best = Trial("1", "tune-x-1", values, 2, 0.5, False, "", "checkpoint_0")
    origin = {
        "search": "tune-x",
        "search_run_id": "abc",
        "best_trial": "tune-x-1",
        "values": values,
    }
    (tmp_path / "tune").mkdir()
    write_summary(tmp_path / "tune", best, [best], None, origin)
    (tmp_path / "params.yaml").write_text(
        "train: {lr: 0.5, momentum: 0.8}\ndata: {crop_size: 96}\n"
    )
    overlay, tags = read_refit(tmp_path / "tune")
    p = load_params(tmp_path / "params.yaml", ["data.crop_size=32"], overlay=overlay)
    assert (p.train.lr, p.train.momentum, p.data.crop_size) == (0.0123, 0.8, 32)
    assert tags == {
        "danet.refit_of_search": "tune-x",
        "danet.search_run_id": "abc",
        "danet.refit_of_trial": "tune-x-1",
    }
    assert load_params(tmp_path / "params.yaml").train.lr == 0.5  # without --refit: params.yaml
    with pytest.raises(
        ConfigError, match=r"^--refit .*nowhere: no best_params.yaml \(run danet tune first\)$"
    ):
        read_refit(tmp_path / "nowhere")
    (tmp_path / "tune" / "search.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"search.json: not written by danet tune"):
        read_refit(tmp_path / "tune")


def test_refit_takes_only_what_the_search_searched_and_exactly(tmp_path: Path) -> None:
    """best_params.yaml may set only the searched keys (a train.epochs or mlflow.experiment
    added by hand is refused in one line); a malformed one is one line; a float rounded to 6
    digits (files of earlier versions) is the trial's exact value from search.json."""
    from pipeline.training.search_summary import read_refit

    exact = 0.012345678901234
    values = {"train.lr": exact, "train.loss_weights.pam": 0.5}
    origin = {"search": "s", "search_run_id": "a", "best_trial": "t", "values": values}
    folder = tmp_path / "tune"
    folder.mkdir()
    (folder / "search.json").write_text(json.dumps(origin))
    best = folder / "best_params.yaml"
    best.write_text("train: {lr: 0.0123457, loss_weights: {out: 1.0, pam: 0.5}}\n")
    overlay, _ = read_refit(folder)
    assert overlay["train"]["lr"] == exact
    for extra, key in (
        ("train: {epochs: 500}", "train.epochs"),
        ("mlflow: {experiment: x}", "mlflow.experiment"),
    ):
        best.write_text(f"{extra}\n")
        with pytest.raises(ConfigError, match=rf"best_params\.yaml: {key} was not searched"):
            read_refit(folder)
    for text in ("train: 5\n", "- a list\n", "train: {lr: [\n"):
        best.write_text(text)
        with pytest.raises(ConfigError, match=r"best_params\.yaml: "):
            read_refit(folder)


def refit_folder(tmp: Path, values: dict[str, Any], best_params: str) -> Path:
    """A tune.out of a search whose winning trial trained ``values``, with ``best_params``."""
    folder = tmp / "tune"
    folder.mkdir(exist_ok=True)
    origin = {"search": "s", "search_run_id": "a", "best_trial": "t1", "values": values}
    (folder / "search.json").write_text(json.dumps(origin))
    (folder / "best_params.yaml").write_text(best_params)
    return folder


def test_refit_trains_exactly_what_the_winning_trial_trained(tmp_path: Path) -> None:
    """A best_params.yaml that leaves out a searched key (params.yaml's value would be trained)
    or disagrees with search.json's value (a value no trial trained) is refused in one line
    naming the key and both values; the winning trial's own file is taken as it is."""
    from pipeline.training.search_summary import read_refit

    values = {"train.lr": 0.0123456789, "data.crop_size": 48, "train.loss_weights.pam": 0.5}
    good = "train: {lr: 0.0123456789, loss_weights: {out: 1.0, pam: 0.5}}\ndata: {crop_size: 48}\n"
    overlay, tags = read_refit(refit_folder(tmp_path, values, good))
    assert overlay == {
        "train": {"lr": 0.0123456789, "loss_weights": {"out": 1.0, "pam": 0.5}},
        "data": {"crop_size": 48},
    }
    assert tags["danet.refit_of_trial"] == "t1"
    advice = r": restore it, or train those params with --params instead of --refit$"
    for text, message in (
        ("", r"train\.lr is missing but the winning trial trained 0\.0123456789 \(search\.json\)"),
        ("{}\n", r"train\.lr is missing but the winning trial trained 0\.0123456789"),
        (
            "train: {lr: 0.5, loss_weights: {pam: 0.5}}\ndata: {crop_size: 48}\n",
            r"train\.lr is 0\.5 but the winning trial trained 0\.0123456789 \(search\.json\)",
        ),
        (
            "train: {lr: 0.0123456789, loss_weights: {pam: 0.5}}\n",
            r"data\.crop_size is missing but the winning trial trained 48",
        ),
        (
            "train: {lr: 0.0123456789, loss_weights: {out: 1.0}}\ndata: {crop_size: 48}\n",
            r"train\.loss_weights\.pam is missing but the winning trial trained 0\.5",
        ),
        (
            "train: {lr: 0.0123456789, loss_weights: {pam: 0.75}}\ndata: {crop_size: 48}\n",
            r"train\.loss_weights\.pam is 0\.75 but the winning trial trained 0\.5",
        ),
        (  # exact: the next float after the trial's is not the trial's
            "train: {lr: 0.012345678900000002, loss_weights: {pam: 0.5}}\ndata: {crop_size: 48}\n",
            r"train\.lr is 0\.012345678900000002 but the winning trial trained 0\.0123456789",
        ),
    ):
        folder = refit_folder(tmp_path, values, text)
        with pytest.raises(
            ConfigError, match=r"^--refit .*tune/best_params\.yaml: " + message
        ) as err:
            read_refit(folder)
        assert re.search(advice, str(err.value)) and "\n" not in str(err.value)
    folder = refit_folder(tmp_path, {"train.amp": True}, "train: {amp: 1}\n")
    with pytest.raises(ConfigError, match=r"train\.amp is 1 but the winning trial trained True"):
        read_refit(folder)  # a flag is not a number


def test_a_storage_folder_a_stage_did_not_write_is_not_its_own(tmp_path: Path) -> None:
    """A run's or search's folder under train.storage_path is deleted (--restart) or written into
    only when it holds what Ray Train, Ray Tune and the pipeline write there (or nothing):
    a user's folder is refused in one line, before anything is deleted or started."""
    from pipeline.cluster import RUN_WRITES, check_run_name, check_search_name
    from pipeline.outputs import foreign_names
    from pipeline.training.checkpoint import DIVERGED_FILE

    assert foreign_names([DIVERGED_FILE], RUN_WRITES) == []
    storage = tmp_path / "ray"
    run = storage / "run1"
    (run / "checkpoint_2026-12-05_00-31-01.248857").mkdir(parents=True)
    for name in (".validate_storage_marker", "checkpoint_manager_snapshot.json", DIVERGED_FILE):
        (run / name).write_text("{}")
    search, trials = storage / "s", storage / "s-trials"
    for name in ("dd27a_00000", "dd27a_00001", "1a2b3c4d"):  # random search's, Optuna's trial ids
        (search / name).mkdir(parents=True)
        (trials / f"s-{name}" / "checkpoint_2026-12-05_00-17-32.505100").mkdir(parents=True)
        (trials / f"s-{name}" / "checkpoint_manager_snapshot.json").write_text("{}")
    for name in (
        "tuner.pkl",
        "experiment_state-2026-12-05_00-14-40.json",
        "basic-variant-state-2026-12-05_00-14-40.json",
        "search_gen_state-2026-12-05_00-31-44.json",
        "searcher-state-2026-12-05_00-31-44.pkl",
        ".validate_storage_marker",
    ):
        (search / name).write_text("state")
    check_run_name(str(storage), "run1")
    check_run_name(str(storage), "new")  # absent: created by the run
    (storage / "empty").mkdir()
    check_run_name(str(storage), "empty")
    check_search_name(str(storage), "s")
    check_search_name(str(storage), "new")

    (run / "thesis.txt").write_text("months of work")
    with pytest.raises(
        ConfigError,
        match=r"^train\.run_name 'run1': .*ray/run1 holds what danet train does not write "
        r"\(thesis\.txt\): not its run folder; choose another run name$",
    ):
        check_run_name(str(storage), "run1")
    (storage / "afile").write_text("a file of the user's")
    with pytest.raises(ConfigError, match=r"^train\.run_name 'afile': .*ray/afile is a file"):
        check_run_name(str(storage), "afile")
    (search / "notes.md").write_text("notes")
    with pytest.raises(
        ConfigError,
        match=r"^tune\.name 's': .*ray/s holds what danet tune does not write \(notes\.md\): "
        r"not its search folder; choose another search name$",
    ):
        check_search_name(str(storage), "s")
    (search / "notes.md").unlink()
    (trials / "s-dd27a_00001" / "thesis.txt").write_text("months of work")
    (trials / "photo.jpg").write_text("a photo")
    with pytest.raises(
        ConfigError,
        match=r"^tune\.name 's': .*ray/s-trials holds what danet tune does not write "
        r"\(photo\.jpg, s-dd27a_00001/thesis\.txt\): not its trials folder",
    ):
        check_search_name(str(storage), "s")
