"""One trial of a search: its job (the base job with the trial's lr and crop size), its
MLflow run nested under the search's, and the Ray Train run that reports each evaluation to
Tune (``TuneReportCallback``)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from pipeline.config import TrainParams, TuneParams
from pipeline.training.driver import fit
from pipeline.training.job import TrainJob

log = logging.getLogger(__name__)
TRIAL_TAG = "danet.tune_trial"


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
