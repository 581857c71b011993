"""Ray Tune search over ``tune.space``: any params keys of the recipe (model, data, train), each
with a distribution (``loguniform``, ``uniform``, ``randint`` (both ends included), ``choice``,
``grid``), sampled at random (Tune's variant generator, which also expands grids) or by Optuna's
TPE (``tune.search_alg: optuna``, seeded, under a concurrency limit); the default space is the
two knobs DANet is most sensitive to, base learning rate and crop size.

Each trial is a function that builds and fits its own ``TorchTrainer`` (the current Train V2 +
Tune API; a trainer passed to ``Tuner`` fails) with Tune's ``TuneReportCallback``, so every
evaluation of the Train run reaches Tune as one result. ASHA stops trials whose val mIoU falls
below the rung's cut-off (``tune.scheduler: asha``; ``none`` runs every trial to the end); the trial's Ray Train job is then torn down through Ray's state API,
which needs ``ray[default]`` and the dashboard (``connect_ray`` starts it for a local Ray).

MLflow: a parent run per search, one nested run per trial (tag ``mlflow.parentRunId``). The
search is named after its identity (the trials' and the search space's): started again with the
same identity, ``Tuner.restore`` resumes it (the searcher's state with it), and each unfinished trial's Train run resumes from its
own last checkpoint. What the finished search writes is pipeline/training/search_summary.py's; one trial is
pipeline/training/trial.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.cluster import (
    check_fits,
    check_search_name,
    check_tracking_for,
    connect_ray,
    storage_uri,
)
from pipeline.config import ConfigError
from pipeline.locks import exclusive
from pipeline.outputs import check_output, check_outside, check_own
from pipeline.searchspace import candidates, search_size
from pipeline.sections import DataParams, MlflowParams, ModelParams, TrainParams, TuneParams
from pipeline.training.checkpoint import delete_run
from pipeline.training.driver import RUN_FILES, ray_put
from pipeline.training.job import TrainJob, default_run_name, flat_params, prepare_job
from pipeline.training.records import VAL_MIOU
from pipeline.training.search_summary import (
    SEARCH_FILES,
    SearchSummary,
    summarize_search,
    trial_record,
)
from pipeline.training.session import backbone_weights
from pipeline.training.trial import SearchJob, trial_train, tune_trial, with_values

log = logging.getLogger(__name__)
TRIAL_MEMORY = 256 * 1024**2  # bytes of Ray's logical "memory" resource per trial driver


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
    from pipeline import mlflowstore as mlt

    job = check_space(model, data, trial_train(train, tune), tune)
    check_output(tune.out, "tune.out")
    check_own(tune.out, "tune.out", "tune", (*RUN_FILES, *SEARCH_FILES))
    check_outside(tune.out, {"data.shards": data.shards})
    uri = mlt.resolve_tracking_uri(tracking.tracking_uri)
    check_tracking_for(train.ray_address, uri)
    name = tune.name or search_name(job, tune)
    experiment = tracking.experiment or job.dataset
    storage = storage_uri(train.storage_path)
    check_search_name(storage, name)
    check_fits(train.ray_address, trial_train(train, tune))
    connect_ray(train.ray_address)
    if hold is not None:
        hold.enter_context(exclusive(f"{storage}/{name}", f"tune.name {name}"))
    if restart:
        log.info("[tune] --restart: deleting search %s and running it anew", name)
        for folder in (f"{storage}/{name}", f"{storage}/{name}-trials"):
            delete_run(folder)
        mlt.retire_run(uri, experiment, name)
    space_params = {f"tune.{k}": str(v) for k, v in asdict(tune).items()}
    tags = {"dataset": job.dataset, "danet.kind": "tune", "mlflow.source.name": "danet tune"}
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


def check_space(
    model: ModelParams, data: DataParams, train: TrainParams, tune: TuneParams
) -> TrainJob:
    """The base job, checked with each value that bounds ``tune.space`` (every choice or grid
    point, both ends of a range) set in turn: a value a trial could draw and not run is one line
    now, not a failed trial later."""
    search_size(tune.space, tune.num_samples)
    base = {"model": model, "data": data, "train": train}
    bounds = candidates(tune.space)
    for key, values in bounds.items():
        for value in values:
            where = f"tune.space.{key} {value!r}"
            try:
                sections = with_values(base, {key: value})
                prepare_job(sections["model"], sections["data"], sections["train"], crop_from=where)
            except ConfigError as err:
                message = str(err)
                raise ConfigError(
                    message if message.startswith(where) else f"{where}: {message}"
                ) from None
    first = with_values(base, {key: values[0] for key, values in bounds.items()})
    return prepare_job(first["model"], first["data"], first["train"])


def param_space(tune: TuneParams) -> dict[str, Any]:
    """``tune.space`` as Ray Tune's search space (randint's upper end included, as written)."""
    from ray import tune as rt

    make = {
        "loguniform": lambda a: rt.loguniform(a[0], a[1]),
        "uniform": lambda a: rt.uniform(a[0], a[1]),
        "randint": lambda a: rt.randint(a[0], a[1] + 1),
        "choice": lambda a: rt.choice(list(a)),
        "grid": lambda a: rt.grid_search(list(a)),
    }
    return {
        key: make[kind](args) for key, spec in tune.space.items() for kind, args in spec.items()
    }


def searcher(tune: TuneParams) -> Any:
    """Random sampling (and grids), or Optuna's TPE, seeded; at most ``max_concurrent`` trials."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if tune.search_alg == "random":
        return BasicVariantGenerator(random_state=tune.seed, max_concurrent=tune.max_concurrent)
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(seed=tune.seed), max_concurrent=tune.max_concurrent)


def make_tuner(search: SearchJob, tune: TuneParams, storage: str, evaluations: int) -> Any:
    """A new Tuner, or the search's own restored one when it was started before."""
    from ray import tune as rt
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    # The trial only drives its Train run: the Train workers hold the CPUs/GPUs. Ray refuses an
    # empty request, so the trial asks for memory alone.
    trainable = rt.with_resources(
        rt.with_parameters(tune_trial, search=search), {"CPU": 0, "memory": TRIAL_MEMORY}
    )
    path = f"{storage}/{search.search_name}"
    if rt.Tuner.can_restore(path):
        log.info("[tune] resuming search %s from %s", search.search_name, path)
        return rt.Tuner.restore(path, trainable, resume_errored=True)
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            max_t=evaluations,
            grace_period=min(tune.grace_period, evaluations),
            reduction_factor=tune.reduction_factor,
        )
        if tune.scheduler == "asha"
        else FIFOScheduler()
    )
    return rt.Tuner(
        trainable,
        param_space=param_space(tune),
        tune_config=rt.TuneConfig(
            metric=VAL_MIOU,
            mode="max",
            num_samples=tune.num_samples,
            max_concurrent_trials=tune.max_concurrent,
            scheduler=scheduler,
            search_alg=searcher(tune),
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
) -> SearchSummary:
    """Run, resume or reuse the search; write the best trial's outputs; return its summary."""
    from pipeline import mlflowstore as mlt

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
