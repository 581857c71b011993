"""Ray Tune search over the two knobs DANet is most sensitive to: base learning rate and crop size.

Each trial is a function that builds and fits its own ``TorchTrainer`` (the current Train V2 +
Tune API; a trainer passed to ``Tuner`` fails) with Tune's ``TuneReportCallback``, so every
evaluation of the Train run reaches Tune as one result. ASHA stops trials whose val mIoU falls
below the rung's cut-off; the trial's Ray Train job is then torn down through Ray's state API,
which needs ``ray[default]`` and the dashboard (``connect_ray`` starts it for a local Ray).

MLflow: a parent run per search, one nested run per trial (tag ``mlflow.parentRunId``). The
search is named after its identity (the trials' and the search space's): started again with the
same identity, ``Tuner.restore`` resumes it, and each unfinished trial's Train run resumes from its
own last checkpoint. The best trial's model goes to ``tune.out`` exactly as ``danet train``
writes its own, plus ``best_params.yaml`` and ``trials.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.cluster import check_tracking_for, connect_ray, storage_uri
from pipeline.config import (
    ConfigError,
    DataParams,
    MlflowParams,
    ModelParams,
    TrainParams,
    TuneParams,
)
from pipeline.errors import TrainingFailed, first_line
from pipeline.locks import exclusive
from pipeline.outputs import atomic_write_text, check_output, check_outside
from pipeline.training.checkpoint import delete_run
from pipeline.training.driver import backbone_weights, finalize, fit, ray_put
from pipeline.training.job import TrainJob, default_run_name, flat_params, prepare_job
from pipeline.training.records import VAL_MIOU

log = logging.getLogger(__name__)
TRIAL_TAG = "danet.tune_trial"
TRIAL_MEMORY = 256 * 1024**2  # bytes of Ray's logical "memory" resource per trial driver


@dataclass(frozen=True)
class SearchJob:
    """What every trial needs, pickled to the trial actors."""

    job: TrainJob  # the base job: lr and crop size are replaced per trial
    search_name: str
    trial_storage: str  # absolute: trials run with another working directory
    experiment: str
    parent_run_id: str
    params: dict[str, str]
    weights: Any = None  # the backbone's pretrained weights in Ray's object store


@dataclass
class Trial:
    """One trial as trials.json lists it."""

    trial_id: str
    run_name: str
    lr: float
    crop_size: int
    evaluations: int
    best_val_miou: float
    stopped_early: bool
    error: str
    latest_checkpoint: str


def trial_job(search: SearchJob, lr: float, crop_size: int, run_id: str = "") -> TrainJob:
    """The base job with one trial's learning rate and crop size; a trial reports (and
    checkpoints) at evaluations only, so each Tune result is one evaluation."""
    job = search.job
    train = dataclasses.replace(
        job.train, lr=float(lr), storage_path=search.trial_storage, checkpoint_every=0
    )
    data = dataclasses.replace(job.data, crop_size=int(crop_size))
    return dataclasses.replace(job, data=data, train=train, mlflow_run_id=run_id)


def trial_train(train: TrainParams, tune: TuneParams) -> TrainParams:
    """The train section a trial runs with: the search's epochs, evaluation cadence and CPUs."""
    return dataclasses.replace(
        train,
        epochs=tune.epochs,
        eval_every_epochs=tune.eval_every_epochs or train.eval_every_epochs,
        cpus_per_worker=tune.cpus_per_trial or train.cpus_per_worker,
    )


def trial_run_name(search_name: str, trial_id: str) -> str:
    return f"{search_name}-{trial_id}"


def tune_trial(config: dict[str, Any], search: SearchJob) -> None:
    """One trial: its MLflow run (nested under the search's), then a Ray Train run reporting to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.artifacts import tracking as mlt

    lr, crop = float(config["lr"]), int(config["crop_size"])
    run_name = trial_run_name(search.search_name, ray.tune.get_context().get_trial_id())
    uri = search.job.tracking_uri
    params = {**search.params, "train.lr": str(lr), "data.crop_size": str(crop)}
    tags = {"mlflow.parentRunId": search.parent_run_id, TRIAL_TAG: run_name}
    run_id = mlt.start_or_resume_run(uri, search.experiment, run_name, params, tags)
    log.info("[tune] trial %s: lr %.4g, crop %d", run_name, lr, crop)
    try:
        fit(
            trial_job(search, lr, crop, run_id),
            run_name,
            callbacks=[TuneReportCallback()],
            weights=search.weights,
        )
    except BaseException:
        mlt.end_run(uri, run_id, "FAILED")
        raise
    mlt.end_run(uri, run_id, "FINISHED")


def search_name(job: TrainJob, tune: TuneParams) -> str:
    """``tune-<hash>`` of the search space and everything that changes a trial's result."""
    space = {k: v for k, v in asdict(tune).items() if k not in ("out", "name")}
    blob = json.dumps([default_run_name(job), space], sort_keys=True)
    return "tune-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def prepare_search(
    model: ModelParams,
    data: DataParams,
    train: TrainParams,
    tracking: MlflowParams,
    tune: TuneParams,
    restart: bool = False,
    hold: ExitStack | None = None,
) -> SearchJob:
    """Check the job with the largest crop, connect, open the search's MLflow run; ``hold`` gets
    the search's lock (one process per search at a time) before anything is deleted or started.

    ``restart`` deletes the search's results and its trials' runs first (and renames its MLflow
    run out of the way), so it starts anew; otherwise a started search resumes and a finished
    one is reused: Tuner.restore gives its results without training.
    """
    from pipeline.artifacts import tracking as mlt

    try:
        data = dataclasses.replace(data, crop_size=max(tune.crop_sizes))
        job = prepare_job(model, data, trial_train(train, tune))
    except ConfigError as err:
        if str(err).startswith("data.crop_size"):
            raise ConfigError(f"tune.crop_sizes: {err}") from None
        raise
    check_output(tune.out, "tune.out")
    check_outside(tune.out, {"data.shards": data.shards})
    uri = mlt.resolve_tracking_uri(tracking.tracking_uri)
    check_tracking_for(train.ray_address, uri)
    connect_ray(train.ray_address)
    name = tune.name or search_name(job, tune)
    experiment = tracking.experiment or job.dataset
    storage = storage_uri(train.storage_path)
    if hold is not None:
        hold.enter_context(exclusive(f"{storage}/{name}", f"tune.name {name}"))
    if restart:
        log.info("[tune] --restart: deleting search %s and running it anew", name)
        for folder in (f"{storage}/{name}", f"{storage}/{name}-trials"):
            delete_run(folder)
        mlt.retire_run(uri, experiment, name)
    space_params = {f"tune.{k}": str(v) for k, v in asdict(tune).items()}
    tags = {"dataset": job.dataset, "danet.kind": "tune"}
    parent = mlt.start_or_resume_run(uri, experiment, name, space_params, tags)
    return SearchJob(
        job=dataclasses.replace(job, tracking_uri=uri),
        search_name=name,
        trial_storage=f"{storage}/{name}-trials",
        experiment=experiment,
        parent_run_id=parent,
        params=flat_params(job),
        weights=ray_put(backbone_weights(model)),
    )


def make_tuner(search: SearchJob, tune: TuneParams, storage: str, evaluations: int) -> Any:
    """A new Tuner, or the search's own restored one when it was started before."""
    from ray import tune as rt
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    # The trial only drives its Train run: the Train workers hold the CPUs/GPUs. Ray refuses an
    # empty request, so the trial asks for memory alone.
    trainable = rt.with_resources(
        rt.with_parameters(tune_trial, search=search), {"CPU": 0, "memory": TRIAL_MEMORY}
    )
    path = f"{storage}/{search.search_name}"
    if rt.Tuner.can_restore(path):
        log.info("[tune] resuming search %s from %s", search.search_name, path)
        return rt.Tuner.restore(path, trainable, resume_errored=True)
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=evaluations,
        grace_period=min(tune.grace_period, evaluations),
        reduction_factor=tune.reduction_factor,
    )
    return rt.Tuner(
        trainable,
        param_space={
            "lr": rt.loguniform(tune.lr_min, tune.lr_max),
            "crop_size": rt.choice(list(tune.crop_sizes)),
        },
        tune_config=rt.TuneConfig(
            metric=VAL_MIOU,
            mode="max",
            num_samples=tune.num_samples,
            max_concurrent_trials=tune.max_concurrent,
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(
                random_state=tune.seed, max_concurrent=tune.max_concurrent
            ),
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=rt.RunConfig(name=search.search_name, storage_path=storage),
    )


def run_search(
    model: ModelParams,
    data: DataParams,
    train: TrainParams,
    tracking: MlflowParams,
    tune: TuneParams,
    restart: bool = False,
) -> dict[str, Any]:
    """Run, resume or reuse the search; write the best trial's outputs; return its summary."""
    from pipeline.artifacts import tracking as mlt

    # Ctrl-C stops the search like SIGTERM does (the CLI unwinds, trials keep their checkpoints,
    # the next run resumes); Tune's own handler would return the unfinished trials as results.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    with ExitStack() as hold:
        search = prepare_search(model, data, train, tracking, tune, restart, hold)
        evaluations = math.ceil(tune.epochs / search.job.train.eval_every_epochs)
        tuner = make_tuner(search, tune, storage_uri(train.storage_path), evaluations)
        try:
            grid = tuner.fit()
        except Exception:
            mlt.end_run(search.job.tracking_uri, search.parent_run_id, "FAILED")
            raise
        trials = [
            trial_record(r, search, evaluations)
            for r in sorted(grid, key=lambda r: Path(r.path).name)
        ]
        return summarize_search(trials, search, tracking, Path(tune.out))


def trial_record(result: Any, search: SearchJob, evaluations: int) -> Trial:
    """A Tune result -> its Trial (trial order is the results' folder order, restored or not)."""
    history = result.metrics_dataframe
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    scores = history[VAL_MIOU].tolist() if history is not None and VAL_MIOU in history else []
    return Trial(
        trial_id=trial_id,
        run_name=trial_run_name(search.search_name, trial_id),
        lr=float(result.config["lr"]),
        crop_size=int(result.config["crop_size"]),
        evaluations=len(scores),
        best_val_miou=max(scores) if scores else float("nan"),
        stopped_early=result.error is None and 0 < len(scores) < evaluations,
        error=first_line(result.error) if result.error else "",
        latest_checkpoint=str(history["checkpoint_path"].iloc[-1]) if scores else "",
    )


def summarize_search(
    trials: list[Trial], search: SearchJob, tracking: MlflowParams, out: Path
) -> dict[str, Any]:
    """Trials -> MLflow statuses, the best trial's outputs, ``best_params.yaml`` and ``trials.json``."""
    from mlflow.tracking import MlflowClient
    from ray.train import Checkpoint

    from pipeline.artifacts import tracking as mlt

    client = MlflowClient(search.job.tracking_uri)
    for trial in trials:
        _close_trial_run(client, search, trial)
    done = [t for t in trials if t.evaluations and not math.isnan(t.best_val_miou)]
    if not done:
        mlt.end_run(search.job.tracking_uri, search.parent_run_id, "FAILED")
        first = next((t.error for t in trials if t.error), "no trial reported a result")
        raise TrainingFailed(f"tune: every trial failed ({first}); nothing was written")
    best = max(done, key=lambda t: t.best_val_miou)
    job = trial_job(search, best.lr, best.crop_size, _trial_run_id(client, search, best))
    checkpoint = Checkpoint(
        f"{search.trial_storage}/{best.run_name}/{Path(best.latest_checkpoint).name}"
    )
    with checkpoint.as_directory() as latest:  # every checkpoint holds the trial's best weights
        metrics = finalize(Path(latest), job, best.run_name, out, tracking)
    summary = {
        "search": search.search_name,
        "best": {
            k: getattr(best, k)
            for k in ("trial_id", "run_name", "lr", "crop_size", "best_val_miou")
        },
        "trials": [asdict(t) for t in trials],
        "mlflow_parent_run_id": search.parent_run_id,
        "best_metrics": asdict(metrics),
    }
    write_summary(out, summary)
    log_search(search, best, out)
    return summary


def log_search(search: SearchJob, best: Trial, out: Path) -> None:
    import mlflow

    from pipeline.artifacts.tracking import tracking_uri

    with tracking_uri(search.job.tracking_uri), mlflow.start_run(run_id=search.parent_run_id):
        mlflow.log_metric("best_val_miou", best.best_val_miou)
        tags = {
            "best_trial": best.run_name,
            "best_lr": f"{best.lr:.6g}",
            "best_crop_size": str(best.crop_size),
        }
        mlflow.set_tags(tags)
        mlflow.log_artifact(str(out / "best_params.yaml"))
        mlflow.log_artifact(str(out / "trials.json"))


def _trial_run_id(client: Any, search: SearchJob, trial: Trial) -> str:
    from pipeline.artifacts.tracking import named_run

    exp = client.get_experiment_by_name(search.experiment)
    run = named_run(client, exp.experiment_id, trial.run_name) if exp is not None else None
    return run.info.run_id if run is not None else ""


def _close_trial_run(client: Any, search: SearchJob, trial: Trial) -> None:
    """A trial ASHA stopped was killed mid-run: mark its MLflow run and say why."""
    run_id = _trial_run_id(client, search, trial)
    if not run_id:
        return
    client.set_tag(run_id, "tune.stopped_early", str(trial.stopped_early).lower())
    if not math.isnan(trial.best_val_miou):  # a metric: the UI's trial comparison plots it
        client.log_metric(run_id, "best_val_miou", trial.best_val_miou)
    status = client.get_run(run_id).info.status
    if trial.error:
        client.set_terminated(run_id, "FAILED")
    elif trial.stopped_early:  # its trainer may have ended the run FINISHED after Tune stopped it
        client.set_terminated(run_id, "KILLED")
    elif status == "RUNNING":
        client.set_terminated(run_id, "FINISHED")


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """``best_params.yaml`` (the best trial's params: a params file of its own, or the values to
    copy into params.yaml) and ``trials.json`` next to the model."""
    best = summary["best"]
    params = {
        "train": {"lr": float(f"{best['lr']:.6g}")},
        "data": {"crop_size": best["crop_size"]},
    }
    header = (  # comments: the file stays a params file (danet train --params best_params.yaml)
        f"# the best trial of the search: {best['run_name']}, val mIoU "
        f"{best['best_val_miou']:.6f}\n"
    )
    for name, text in (
        ("best_params.yaml", header + yaml.safe_dump(params, sort_keys=False)),
        ("trials.json", json.dumps(summary["trials"], indent=2) + "\n"),
    ):
        atomic_write_text(out / name, text)


def format_trials(summary: dict[str, Any]) -> str:
    lines = [f"{'trial':<12} {'lr':>9} {'crop':>5} {'evals':>5} {'best mIoU':>9}  status"]
    for t in summary["trials"]:
        status = t["error"] or ("stopped early (ASHA)" if t["stopped_early"] else "completed")
        mark = " <- best" if t["trial_id"] == summary["best"]["trial_id"] else ""
        lines.append(
            f"{t['trial_id']:<12} {t['lr']:9.4g} {t['crop_size']:5d} {t['evaluations']:5d} "
            f"{t['best_val_miou']:9.4f}  {status}{mark}"
        )
    return "\n".join(lines)
