"""One trial of a search: its job (the base job with the trial's values of ``tune.space`` set),
its MLflow run nested under the search's, and the Ray Train run that reports each evaluation to
Tune (``TuneReportCallback``)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config import SECTIONS, section_from_mapping
from pipeline.paramsfile import set_key
from pipeline.sections import TrainParams, TuneParams
from pipeline.training.driver import fit
from pipeline.training.job import TrainJob

log = logging.getLogger(__name__)
TRIAL_TAG = "danet.tune_trial"


@dataclass(frozen=True)
class SearchJob:
    """What every trial needs, pickled to the trial actors."""

    job: TrainJob  # the base job: each trial sets its values of tune.space
    search_name: str
    trial_storage: str  # absolute: trials run with another working directory
    experiment: str
    parent_run_id: str
    params: dict[str, str]
    weights: Any = None  # the backbone's pretrained weights in Ray's object store


def with_values(sections: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """``sections`` (by name) with dotted ``values`` set as ``--set`` does, rebuilt and checked."""
    raw = {name: dataclasses.asdict(section) for name, section in sections.items()}
    for key, value in values.items():
        set_key(raw, key, value, key)
    return {name: section_from_mapping(SECTIONS[name], raw[name]) for name in raw}


def trial_job(search: SearchJob, values: dict[str, Any], run_id: str = "") -> TrainJob:
    """The base job with one trial's values (dotted params keys: ``train.lr``); a trial reports
    (and checkpoints) at evaluations only, so each Tune result is one evaluation."""
    job = search.job
    sections = with_values({"model": job.model, "data": job.data, "train": job.train}, values)
    train = dataclasses.replace(
        sections["train"], storage_path=search.trial_storage, checkpoint_every=0
    )
    return dataclasses.replace(
        job, model=sections["model"], data=sections["data"], train=train, mlflow_run_id=run_id
    )


def plain(value: Any) -> Any:
    """A sampled value as Python's own type (Tune and Optuna hand out numpy scalars)."""
    return value.item() if hasattr(value, "item") else value


def describe_values(values: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
    )


def trial_train(train: TrainParams, tune: TuneParams) -> TrainParams:
    """The train section a trial runs with: the search's epochs, evaluation cadence, CPUs and
    GPUs (a share of one lets trials train side by side on it)."""
    return dataclasses.replace(
        train,
        epochs=tune.epochs,
        eval_every_epochs=tune.eval_every_epochs or train.eval_every_epochs,
        cpus_per_worker=tune.cpus_per_trial or train.cpus_per_worker,
        gpus_per_worker=tune.gpus_per_trial or train.gpus_per_worker,
    )


def trial_number(run_name: str) -> int:
    """1, 2, ... from a trial's name (Tune's trial ids end in ``_00000``, ``_00001``, ...)."""
    tail = run_name.rsplit("_", 1)[-1]
    return int(tail) + 1 if tail.isdigit() else 0


def trial_title(run_name: str) -> str:
    """The name the UI shows for a trial: ``trial 2``."""
    return f"trial {trial_number(run_name)}"


def trial_run_name(search_name: str, trial_id: str) -> str:
    return f"{search_name}-{trial_id}"


def tune_trial(config: dict[str, Any], search: SearchJob) -> None:
    """One trial: its MLflow run (nested under the search's), then a Ray Train run reporting to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline import mlflowstore as mlt

    values = {key: plain(value) for key, value in config.items()}
    run_name = trial_run_name(search.search_name, ray.tune.get_context().get_trial_id())
    uri = search.job.tracking_uri
    params = {**search.params, **{key: str(value) for key, value in values.items()}}
    tags = {
        "mlflow.parentRunId": search.parent_run_id,
        TRIAL_TAG: run_name,
        "mlflow.source.name": "danet tune",
    }
    title = trial_title(run_name)  # short: the table's columns show the values and scores
    run_id = mlt.start_or_resume_run(uri, search.experiment, run_name, params, tags, title)
    log.info("[tune] trial %s: %s", run_name, describe_values(values))
    try:
        fit(
            trial_job(search, values, run_id),
            run_name,
            callbacks=[TuneReportCallback()],
            weights=search.weights,
            # a trial's workers may wait for another trial's CPUs: Tune's max_concurrent and
            # check_fits bound the search, not a start timeout (-1: Ray's own default)
            start_retries=-1,
        )
    except BaseException:
        mlt.end_run(uri, run_id, "FAILED")
        raise
    mlt.end_run(uri, run_id, "FINISHED")
