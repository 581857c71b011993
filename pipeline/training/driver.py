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
import os
import socket
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, DataParams, MlflowParams, ModelParams, TrainParams
from pipeline.errors import PipelineError, ServiceError, TrainingError, first_line
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.job import TrainJob, default_run_name, flat_params, prepare_job
from pipeline.training.results import RunSummary, log_outputs, write_outputs
from pipeline.training.worker import train_worker

log = logging.getLogger(__name__)


def connect_ray(address: str, num_cpus: int | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS); otherwise start a local Ray sized to this machine."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS", "")
    if address and address != "auto":
        _probe(address)
    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # The dashboard serves Ray's state API, which Train's placement-group cleanup and Tune's
            # stopping of trials that run Train jobs rely on; it listens on 127.0.0.1 only.
            ray.init(
                num_cpus=num_cpus or os.cpu_count(),
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                log_to_driver=True,
            )
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ServiceError(
            f"train.ray_address {address!r}: cannot connect to Ray ({first_line(err)})"
        ) from None


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an unreachable cluster: ray.init would retry its GCS for minutes."""
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"train.ray_address {address!r}: expected host:port, ray://host:port or auto"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ServiceError(
            f"train.ray_address {address!r}: cannot connect to Ray ({err.strerror or err})"
        ) from None


def storage_uri(path: str) -> str:
    """Ray's storage path: a URI (``s3://``, ``gs://``) as is, a local path made absolute (workers
    and Tune trials run in other working directories)."""
    return path if "://" in path else os.path.abspath(path)


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
        found = next((e for e in _chain(inner) if isinstance(e, PipelineError)), None)
        if found is not None:
            return found
    # A worker process or node died (Ray's actor errors, also behind a failed health check): the
    # other ranks' errors follow from it.
    lost = [c for c in causes if any(_is_lost(e) for e in _chain(c))]
    if lost:
        return TrainingError(
            f"training failed after train.max_failures retries: {first_line(lost[0])}"
        )
    return err


def _is_lost(err: BaseException) -> bool:
    from ray.exceptions import RayActorError

    health = getattr(err, "health_check_failure", None)
    return isinstance(err, RayActorError) or isinstance(health, RayActorError)


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def fit(job: TrainJob, run_name: str, callbacks: list[Any] | None = None) -> Any:
    """One Ray Train run of ``job`` (resumed when ``run_name`` has checkpoints): its Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = job.train
    storage = storage_uri(train.storage_path)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job, "run_dir": f"{storage}/{run_name}"},
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=train.max_failures),
            # the newest ones: every checkpoint carries the best weights so far
            checkpoint_config=CheckpointConfig(num_to_keep=train.checkpoints_to_keep),
            callbacks=callbacks,
        ),
    )
    try:
        return trainer.fit()
    except Exception as err:
        unwrapped = unwrap_failure(err)
        if unwrapped is err:
            raise
        raise unwrapped from None


def run_training(
    model: ModelParams,
    data: DataParams,
    train: TrainParams,
    tracking: MlflowParams,
    fault: tuple[int, int, str] | None = None,
) -> RunSummary:
    """Train (or resume) and write the DVC outputs; returns metrics.json's content."""
    from pipeline.artifacts import tracking as mlt

    job = prepare_job(model, data, train)
    uri = mlt.resolve_tracking_uri(tracking.tracking_uri)
    connect_ray(train.ray_address)
    run_name = train.run_name or default_run_name(job)
    run_id = mlt.start_or_resume_run(
        uri,
        tracking.experiment or job.dataset,
        run_name,
        flat_params(job),
        {"dataset": job.dataset},
    )
    job = dataclasses.replace(job, tracking_uri=uri, mlflow_run_id=run_id, fault=fault)
    try:
        result = fit(job, run_name)
    except BaseException:
        mlt.end_run(uri, run_id, "FAILED")
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name} reported no checkpoint")
    with result.checkpoint.as_directory() as latest:  # local or remote
        return finalize(Path(latest), job, run_name, Path(train.out), tracking)


def finalize(
    latest: Path, job: TrainJob, run_name: str, out: Path, tracking: MlflowParams
) -> RunSummary:
    """A run's newest checkpoint (it holds the best weights) -> DVC outputs, MLflow's."""
    state, history = load_checkpoint(latest)
    summary, segmenter = write_outputs(
        out, job, run_name, history, state, tracking.num_prediction_images
    )
    log_outputs(job, out, segmenter, summary, tracking)
    return summary
