"""MLflow: the tracking URI, runs found by name, and the model as MLflow logs and finds it.

One experiment per dataset, one MLflow run per training run (found again by its name when a run
resumes). The model is logged with ``mlflow.pytorch`` in pickle format, with a signature that
takes any batch and image size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import ServiceError
from pipeline.outputs import project_path

RUN_NAME_TAG = "danet.run_name"


def resolve_tracking_uri(uri: str) -> str:
    """MLFLOW_TRACKING_URI wins over the param; relative sqlite paths become absolute; a server
    must answer its health check (one line error otherwise)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(project_path(uri[len("sqlite:///") :]))
    elif uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as err:
            raise ServiceError(
                f"mlflow.tracking_uri {uri}: server unreachable ({type(err).__name__})"
            ) from None
    elif "://" not in uri and uri:
        uri = project_path(uri).as_uri()
    return uri


@contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for a block, then restore the previous URI.

    ``mlflow.set_tracking_uri`` also sets the MLFLOW_TRACKING_URI environment variable (for
    subprocesses), which would then override every later ``mlflow.tracking_uri`` param of the same
    process; this keeps the change local.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_env, saved_uri = os.environ.get("MLFLOW_TRACKING_URI"), utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)  # type: ignore[arg-type]  # None unsets the variable ...
        if saved_env is not None:  # ... that the user may have set
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def start_or_resume_run(
    uri: str, experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str]
) -> str:
    """The id of the MLflow run named ``run_name``: the existing one (resume) or a new one.

    ``tags`` may hold ``mlflow.parentRunId`` to nest the run (Tune trials under their search).
    """
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    runs = client.search_runs(
        [experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    if runs:
        run_id = runs[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    entries = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(entries), 100):
        client.log_batch(run.info.run_id, params=entries[i : i + 100])
    return run.info.run_id


def find_run(uri: str, experiment: str, run_name: str) -> tuple[str, str] | None:
    """(run id, status) of the MLflow run named ``run_name``, or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    return (runs[0].info.run_id, runs[0].info.status) if runs else None


def retire_run(uri: str, experiment: str, run_name: str) -> None:
    """Rename the MLflow run named ``run_name`` out of the way, so the name starts a new run."""
    from mlflow.tracking import MlflowClient

    found = find_run(uri, experiment, run_name)
    if found is None:
        return
    client = MlflowClient(uri)
    client.set_tag(found[0], RUN_NAME_TAG, f"{run_name}-restarted-{found[0][:8]}")
    if found[1] == "RUNNING":
        client.set_terminated(found[0], "KILLED")


def end_run(uri: str, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_terminated(run_id, status)


def logged_model_uri(run_id: str) -> str | None:
    """The URI of the model logged by run ``run_id`` (in the current tracking URI), or None.

    ``search_logged_models`` looks in the active experiment only unless told where: the run's
    own experiment is asked for explicitly.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        experiment_id = mlflow.get_run(run_id).info.experiment_id
    except MlflowException:
        return None
    models = mlflow.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
        output_format="list",
    )
    return models[0].model_uri if models else None


def log_segmenter(
    segmenter: torch.nn.Module,
    classes: list[str],
    palette: list[list[int]],
    dataset: str,
    val_miou: float,
) -> Any:
    """Log a ``Segmenter`` into the active run as an MLflow pytorch model that serves as is.

    Pickle format with an explicit signature of -1 dims: any batch and image size (the default
    "pt2" format would fix the shapes of an input example). The metadata carries the classes and
    palette, so prediction from a registry URI needs nothing else.
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # Unnamed tensors: a named input reaches the pytorch flavour as a dict, which it refuses.
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),  # RGB in [0, 1]
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(classes), -1, -1))]),  # logits
    )
    return mlflow.pytorch.log_model(
        segmenter,
        name="model",
        signature=signature,
        serialization_format="pickle",
        code_paths=[str(Path(__file__).resolve().parents[2] / "danet")],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "timm", "numpy"],
        metadata={"classes": classes, "palette": palette, "dataset": dataset, "val_miou": val_miou},
    )
