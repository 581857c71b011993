"""``danet train``'s driver: check the job, connect to Ray, fit a TorchTrainer, write the outputs.

The same code runs on one CPU, one GPU or a cluster: the scaling comes from params.yaml
(``train.num_workers``, ``use_gpu``, ``cpus_per_worker``) and ``train.ray_address`` /
``RAY_ADDRESS`` picks the cluster. Every worker reads its own share of the shards.

A run is named after its identity (pipeline/training/job.py) or ``train.run_name``: started
again with the same name, Ray Train V2 hands the workers the run's latest checkpoint and training
continues where it stopped, schedule included. ``FailureConfig(max_failures)`` restarts the
workers after a crash, from that checkpoint too.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from pipeline.cluster import (
    START_RETRIES,
    check_fits,
    check_run_name,
    check_tracking_for,
    connect_ray,
    storage_uri,
)
from pipeline.errors import (
    PipelineError,
    ServiceError,
    TrainingDiverged,
    TrainingError,
    cause_chain,
    first_line,
)
from pipeline.locations import is_url
from pipeline.locks import exclusive
from pipeline.modelrefs import WEIGHTS_FILE
from pipeline.outputs import check_output, check_outside, check_own
from pipeline.sections import DataParams, MlflowParams, ModelParams, TrainParams
from pipeline.training.checkpoint import (
    delete_run,
    finished_checkpoint,
    load_checkpoint,
    pop_diverged,
    prune_untracked,
)
from pipeline.training.job import TrainJob, code_digest, default_run_name, flat_params, prepare_job
from pipeline.training.results import OUTPUT_FILES, RunSummary, log_outputs, write_outputs
from pipeline.training.session import backbone_weights
from pipeline.training.worker import train_worker

RUN_FILES = (*OUTPUT_FILES, WEIGHTS_FILE)  # what train.out (and tune.out) hold

log = logging.getLogger(__name__)


def unwrap_failure(err: BaseException) -> BaseException:
    """Ray's ``TrainingFailedError`` -> the error a worker raised, when it is a PipelineError (bad
    input found on a worker); a lost worker or node -> ``TrainingError``; a bug stays as it is."""
    from ray.train import TrainingFailedError

    if not isinstance(err, TrainingFailedError):
        return err
    causes = list(getattr(err, "worker_failures", {}).values()) or [
        getattr(err, "controller_failure", err)
    ]
    for cause in causes:
        inner = cause.as_instanceof_cause() if hasattr(cause, "as_instanceof_cause") else cause
        found = next((e for e in cause_chain(inner) if isinstance(e, PipelineError)), None)
        if found is not None:
            return found
    if any(_not_started(c) for c in causes):
        return ServiceError(
            f"Ray could not start the training workers ({first_line(causes[0]).split('. ')[0]}; "
            f"{START_RETRIES + 1} tries): free the cluster's CPUs/GPUs (`ray status`: another "
            "Ray instance on this machine? `ray stop` it or join it with --address auto), lower "
            "train.num_workers or cpus_per_worker, or raise RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
        )
    # A worker process or node died (Ray's actor errors, also behind a failed health check): the
    # other ranks' errors follow from it.
    lost = [c for c in causes if any(_is_lost(e) for e in cause_chain(c))]
    if lost:
        return TrainingError(
            f"training failed after train.max_failures retries: {first_line(lost[0])}"
        )
    return err


def _not_started(err: BaseException) -> bool:
    """Ray Train's worker group never started (not placed in time, or its actors failed)."""
    try:
        from ray.train.v2._internal.exceptions import (
            WorkerGroupStartupFailedError,
            WorkerGroupStartupTimeoutError,
        )
    except ImportError:  # another Ray: the error stays as Ray raised it
        return False
    started = (WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError)
    return any(isinstance(e, started) for e in cause_chain(err))


def _is_lost(err: BaseException) -> bool:
    from ray.exceptions import RayActorError

    health = getattr(err, "health_check_failure", None)
    return isinstance(err, RayActorError) or isinstance(health, RayActorError)


def worker_resources(train: TrainParams) -> dict[str, float]:
    """What each Train worker asks Ray for: its CPUs, and with ``use_gpu`` its GPU or share of one
    (``train.gpus_per_worker``; Tune trials: ``tune.gpus_per_trial``)."""
    gpus = {"GPU": train.gpus_per_worker} if train.use_gpu else {}
    return {"CPU": train.cpus_per_worker, **gpus}


def fit(
    job: TrainJob,
    run_name: str,
    callbacks: list[Any] | None = None,
    weights: Any = None,
    fault: tuple[int, int, str] | None = None,
    start_retries: int = START_RETRIES,
) -> Any:
    """One Ray Train run of ``job`` (resumed when ``run_name`` has checkpoints): its Result.
    ``weights``: the backbone's pretrained weights in Ray's object store, or None.
    ``start_retries``: how often a worker group that cannot start is tried again (-1: without
    end, as a search's trial waits for another trial's CPUs)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = job.train
    storage = storage_uri(train.storage_path)
    check_fits(train.ray_address, train)  # a request no node can meet would wait forever
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "job": job,
            "run_dir": f"{storage}/{run_name}",
            "weights": weights,
            "fault": fault,  # a test seam only (pipeline/training/worker.py crash_once)
        },
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker=worker_resources(train),
            placement_strategy=train.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(  # Train V2's at runtime; typed as V1's
                max_failures=train.max_failures,
                controller_failure_limit=start_retries,  # type: ignore[call-arg]
            ),
            # the newest ones: every checkpoint carries the best weights so far
            checkpoint_config=CheckpointConfig(num_to_keep=train.checkpoints_to_keep),
            callbacks=callbacks,
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:
        unwrapped = unwrap_failure(err)
        if unwrapped is err:
            raise
        raise unwrapped from None
    if (diverged := pop_diverged(f"{storage}/{run_name}")) is not None:
        raise TrainingDiverged(*diverged)
    return result


def run_training(
    model: ModelParams,
    data: DataParams,
    train: TrainParams,
    tracking: MlflowParams,
    fault: tuple[int, int, str] | None = None,
    restart: bool = False,
    tags: dict[str, str] | None = None,
) -> RunSummary:
    """Train, resume or reuse, and write the DVC outputs; returns metrics.json's content.

    The run is named after its identity: one that stopped resumes from its newest checkpoint;
    one that finished is not resumed into a no-op but reused (its outputs written again from its
    last checkpoint); ``restart`` deletes the run's checkpoints and trains it anew. ``tags`` go
    onto its MLflow run, new or found (a refit's link to its search).
    """
    from pipeline import mlflowstore as mlt

    job = prepare_job(model, data, train)
    check_output(train.out, "train.out")
    check_own(train.out, "train.out", "train", RUN_FILES)  # a user's folder is never replaced
    check_outside(train.out, {"data.shards": data.shards})
    uri = mlt.resolve_tracking_uri(tracking.tracking_uri)
    check_tracking_for(train.ray_address, uri)
    run_name = train.run_name or default_run_name(job)
    check_run_name(storage_uri(train.storage_path), run_name)
    check_fits(train.ray_address, train)  # before a local Ray starts: against this machine
    run_dir = f"{storage_uri(train.storage_path)}/{run_name}"
    experiment = tracking.experiment or job.dataset
    with exclusive(run_dir, f"train.run_name {run_name}"):  # one driver per run at a time
        if restart:
            log.info("[train] --restart: deleting run %s and training it anew", run_name)
            delete_run(run_dir)
            mlt.retire_run(uri, experiment, run_name)
        elif (finished := finished_checkpoint(run_dir)) is not None:
            return reuse(finished, job, run_name, uri, experiment, tracking, tags or {})
        return train_run(job, run_name, data, tracking, uri, fault, tags or {})


def train_run(
    job: TrainJob,
    run_name: str,
    data: DataParams,
    tracking: MlflowParams,
    uri: str,
    fault: tuple[int, int, str] | None,
    tags: dict[str, str] | None = None,
) -> RunSummary:
    """Train (or resume) the run ``run_name`` and write its outputs; the caller holds its lock."""
    from pipeline import mlflowstore as mlt

    train = job.train
    run_dir = f"{storage_uri(train.storage_path)}/{run_name}"
    experiment = tracking.experiment or job.dataset
    connect_ray(train.ray_address)
    tags = {"dataset": job.dataset, "mlflow.source.name": "danet train", **(tags or {})}
    run_id = mlt.start_or_resume_run(uri, experiment, run_name, flat_params(job), tags)
    source = data.shards if is_url(data.shards) else str(Path(data.shards).resolve())
    mlt.log_lineage(uri, run_id, source, job.dataset, job.split_sha256, code_digest())
    job = dataclasses.replace(
        job,
        tracking_uri=uri,
        mlflow_run_id=run_id,
        system_metrics_every=tracking.system_metrics_every,
        prediction_images=tracking.num_prediction_images,
    )
    weights = backbone_weights(job.model)
    try:
        result = fit(job, run_name, weights=ray_put(weights), fault=fault)
    except BaseException:
        mlt.end_run(uri, run_id, "FAILED")
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name} reported no checkpoint")
    kept = [result.checkpoint.path] + [c.path for c, _ in result.best_checkpoints or []]
    prune_untracked(run_dir, kept)
    with result.checkpoint.as_directory() as latest:  # local or remote
        return finalize(Path(latest), job, run_name, Path(train.out), tracking)


def ray_put(value: Any) -> Any:
    import ray

    return None if value is None else ray.put(value)


def reuse(
    checkpoint: str,
    job: TrainJob,
    run_name: str,
    uri: str,
    experiment: str,
    tracking: MlflowParams,
    tags: dict[str, str] | None = None,
) -> RunSummary:
    """A finished run of the same identity: its outputs again, without training."""
    from ray.train import Checkpoint

    from pipeline import mlflowstore as mlt

    log.info(
        "[train] run %s already finished with this code, params and data: reusing it (--restart trains it anew)",
        run_name,
    )
    found = mlt.find_run(uri, experiment, run_name)
    if found and tags:  # e.g. the same params trained before, now the refit of a search
        mlt.set_run_tags(uri, found[0], tags)
        with mlt.tracking_uri(uri):
            mlt.link_refit(found[0], tags)
    job = dataclasses.replace(job, tracking_uri=uri, mlflow_run_id=found[0] if found else "")
    logged = found is not None and found[1] == "FINISHED"  # the artifacts and model are there
    with Checkpoint(checkpoint).as_directory() as latest:
        return finalize(
            Path(latest), job, run_name, Path(job.train.out), tracking, log_to_mlflow=not logged
        )


def finalize(
    latest: Path,
    job: TrainJob,
    run_name: str,
    out: Path,
    tracking: MlflowParams,
    log_to_mlflow: bool = True,
) -> RunSummary:
    """A run's newest checkpoint (it holds the best weights) -> DVC outputs, MLflow's."""
    state, history = load_checkpoint(latest)
    summary = write_outputs(out, job, run_name, history, state, tracking.num_prediction_images)
    if not (log_to_mlflow and job.mlflow_run_id):
        return summary
    try:
        log_outputs(job, out, summary, tracking)
    except Exception as err:  # MLflow down at the end: the run's outputs are written all the same
        log.warning(
            "[train] MLflow unreachable (%s): the outputs are in %s; the MLflow run %s lacks its "
            "artifacts and model",
            first_line(err),
            out,
            job.mlflow_run_id,
        )
    return summary
