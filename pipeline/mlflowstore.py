"""The MLflow store, owned here and asked by every stage: its URI and local files, runs found
by name, their tags, and the models logged into them.

One experiment per dataset, one MLflow run per training run (found again by its name when a run
resumes). A training run holds its ``model.pt`` as an artifact; the served pyfunc
(pipeline/artifacts/pyfunc.py) is logged into the run when the model is registered, and the
weights move into it (pipeline/registry/logged.py): each file is stored once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.codebase import git_state
from pipeline.errors import ServiceError, first_line
from pipeline.locations import is_url
from pipeline.modelrefs import WEIGHTS_FILE, parse_model_ref, run_artifact_uri
from pipeline.outputs import dead_writer, project_path

RUN_NAME_TAG = "danet.run_name"
WRITER_TAG = "danet.writer"  # on a logged model: the process that logs it (outputs.writer_id)


SQLITE = "sqlite:///"


def configured_uri(uri: str) -> str:
    """The tracking URI in force: MLFLOW_TRACKING_URI wins over the param, as MLflow reads it."""
    return os.environ.get("MLFLOW_TRACKING_URI") or uri


def sqlite_database(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (a relative one: under the project), else None."""
    return project_path(uri[len(SQLITE) :]) if uri.startswith(SQLITE) else None


def local_paths(uri: str) -> dict[str, str]:
    """The local files of the tracking URI in force (pipeline/stores.py keeps outputs off them):
    a SQLite database and its artifacts beside it, or a folder store. A server's are its own."""
    uri = configured_uri(uri)
    if (database := sqlite_database(uri)) is not None:
        return {
            "mlflow.tracking_uri": str(database),
            "mlflow.tracking_uri (its artifacts)": str(database.parent / "mlruns"),
        }
    if uri.startswith("file:"):
        return {"mlflow.tracking_uri": str(project_path(uri.removeprefix("file://")))}
    if uri and not is_url(uri):
        return {"mlflow.tracking_uri": str(project_path(uri))}
    return {}


def resolve_tracking_uri(uri: str) -> str:
    """MLFLOW_TRACKING_URI wins over the param; relative sqlite paths become absolute; a server
    must answer its health check (one line error otherwise)."""
    uri = configured_uri(uri)
    if (database := sqlite_database(uri)) is not None:
        folder = database.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise ServiceError(
                f"mlflow.tracking_uri {uri}: {folder} is not a writable folder for the database"
            )
        uri = f"{SQLITE}{database}"
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
    process; this keeps the change local. The active experiment (``mlflow.set_experiment``) is
    scoped too: one left from another store would make ``mlflow.start_run(run_id=...)`` refuse
    a run of another experiment.
    """
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    saved_env, saved_uri = os.environ.get("MLFLOW_TRACKING_URI"), utils._tracking_uri
    saved_experiment = getattr(fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(uri)
    fluent._active_experiment_id = None
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)  # type: ignore[arg-type]  # None unsets the variable ...
        if saved_env is not None:  # ... that the user may have set
            os.environ["MLFLOW_TRACKING_URI"] = saved_env
        fluent._active_experiment_id = saved_experiment


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: a SQLite store's beside its database file
    (MLflow's default, ``./mlruns``, depends on the working directory of whoever asks first);
    a server's or a folder store's where they say."""
    database = sqlite_database(uri)
    return None if database is None else (database.resolve().parent / "mlruns").as_uri()


def start_or_resume_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, str],
    tags: dict[str, str],
    title: str = "",
) -> str:
    """The id of the MLflow run named ``run_name``: the existing one (resume) or a new one.

    ``tags`` may hold ``mlflow.parentRunId`` to nest the run (Tune trials under their search).
    ``title`` is the name the UI shows (a trial's number and values); the run is found by
    ``run_name``, its tag.
    """
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = (
        found.experiment_id
        if found
        else client.create_experiment(experiment, artifact_location=artifact_root(uri))
    )
    found_run = named_run(client, experiment_id, run_name)
    tags = {"mlflow.source.type": "LOCAL", **tags}  # with mlflow.source.name: the UI's Source
    if found_run is not None:
        run_id = found_run.info.run_id
        client.update_run(run_id, status="RUNNING")
        set_run_tags(uri, run_id, tags)
        return run_id
    tags = {RUN_NAME_TAG: run_name, **tags}
    run = client.create_run(experiment_id, run_name=title or run_name, tags=tags)
    entries = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(entries), 100):
        client.log_batch(run.info.run_id, params=entries[i : i + 100])
    return run.info.run_id


def set_run_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def named_run(client: Any, experiment_id: str, run_name: str) -> Any:
    """The MLflow run that carries our name tag ``run_name`` in an experiment, or None (names
    are plain, checked by ``check_name``: safe in a filter string)."""
    query = f"tags.`{RUN_NAME_TAG}` = '{run_name}'"
    runs = client.search_runs([experiment_id], query, max_results=1)
    return runs[0] if runs else None


def find_run(uri: str, experiment: str, run_name: str) -> tuple[str, str] | None:
    """(run id, status) of the MLflow run named ``run_name``, or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    run = named_run(client, found.experiment_id, run_name)
    return (run.info.run_id, run.info.status) if run is not None else None


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


def log_lineage(
    uri: str, run_id: str, source: str, dataset: str, splits: Sequence[tuple[str, str]], code: str
) -> None:
    """What a run was made from: the git commit (and a dirty flag), the code's digest, and each
    split's shards as an MLflow dataset input: ``<dataset>-<split>``, its location, and the
    first 16 hex digits of its digest (what ``danet evaluate`` and the registry's
    ``data_sha256`` name the same shards by), context ``training`` or ``validation``."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag, RunTag
    from mlflow.tracking import MlflowClient

    commit, dirty = git_state()
    tags = {
        "mlflow.source.git.commit": commit,
        "danet.git_dirty": str(dirty).lower(),
        "danet.code_sha256": code,
    }
    # the client, not mlflow.start_run: leaving that block would mark the run FINISHED while it
    # trains (and MLflow's system-metrics monitor stops logging into a run that is not RUNNING)
    client = MlflowClient(uri)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    inputs = []
    for (split, digest), context in zip(splits, ("training", "validation"), strict=False):
        data = MetaDataset(
            resolve_dataset_source(source), name=f"{dataset}-{split}", digest=digest[:16]
        )  # type: ignore[abstract]
        tag = InputTag("mlflow.data.context", context)
        inputs.append(DatasetInput(data._to_mlflow_entity(), [tag]))
    client.log_inputs(run_id, datasets=inputs)


REFIT_LINK = "danet.refit_run_id"  # on a search's run and its best trial's: the refit's run


def link_refit(run_id: str, tags: Mapping[str, str]) -> None:
    """A refit's run ``run_id`` (``tags``: its own, naming the search's and the trial's runs)
    linked from them: both get the tag ``danet.refit_run_id`` (the current tracking URI)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for key in ("danet.search_run_id", "danet.refit_of_trial_run_id"):
        if linked := tags.get(key):
            client.set_tag(linked, REFIT_LINK, run_id)


def end_run(uri: str, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_terminated(run_id, status)


def drop_dead_pending(run_id: str) -> list[str]:
    """Delete the logged models of run ``run_id`` left PENDING by a killed writer of this host
    (a SIGKILLed ``danet register``; their ``WRITER_TAG`` names a process that no longer runs);
    a live writer's stay. Returns the deleted models' ids."""
    import mlflow
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment_id = mlflow.get_run(run_id).info.experiment_id
    models = client.search_logged_models([experiment_id], f"source_run_id = '{run_id}'")
    dropped = []
    for model in models:
        writer = (model.tags or {}).get(WRITER_TAG, "")
        if model.status == LoggedModelStatus.PENDING and writer and dead_writer(writer):
            client.delete_logged_model(model.model_id)
            dropped.append(model.model_id)
    return dropped


def logged_model_uri(run_id: str) -> str | None:
    """The URI of the model logged by run ``run_id`` (in the current tracking URI), or None.

    ``search_logged_models`` looks in the active experiment only unless told where: the run's
    own experiment is asked for explicitly.
    """
    import mlflow
    from mlflow.entities import LoggedModelStatus
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
    ready = [m for m in models if m.status == LoggedModelStatus.READY]  # not a killed writer's
    return ready[0].model_uri if ready else None


def run_weights_uri(run_id: str) -> str | None:
    """Where the run's ``model.pt`` is: in its logged model (the served pyfunc that danet
    register logged into the run), else the run's own artifact (training logs it there; register
    moves it into the logged model). None: no such run, or no weights."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        if uri := logged_model_uri(run_id):
            model = client.get_logged_model(parse_model_ref(uri).model_name)
            return f"{model.artifact_location.rstrip('/')}/artifacts/{WEIGHTS_FILE}"
        if WEIGHTS_FILE in {a.path for a in client.list_artifacts(run_id)}:
            return run_artifact_uri(run_id)
    except MlflowException:
        return None
    return None


def run_weights(run_id: str) -> Path | None:
    """The run's ``model.pt`` (``run_weights_uri``), downloaded; None: no such run, or no weights."""
    import mlflow
    from mlflow.exceptions import MlflowException

    for _ in range(2):  # moved into a logged model between the look-up and the download: again
        if (uri := run_weights_uri(run_id)) is None:
            return None
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        except MlflowException:
            continue
    return None


def delete_run_artifact(run_id: str, path: str) -> bool:
    """Delete the run's artifact ``path``; False (with a warning) when the store cannot."""
    import logging

    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.tracking import MlflowClient

    try:
        location = MlflowClient().get_run(run_id).info.artifact_uri
        get_artifact_repository(location).delete_artifacts(path)
    except (MlflowException, NotImplementedError, OSError) as err:
        logging.getLogger(__name__).warning(
            "run %s keeps its %s (the store cannot delete it: %s)", run_id, path, first_line(err)
        )
        return False
    return True


def model_run(ref: str, file_run_id: str = "") -> tuple[str, str | None] | None:
    """(run id, logged model id or None) of a model reference, or None when it has no run;
    ``file_run_id``: the run a model file names (pipeline/artifacts/modelfile.recorded_run)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    parsed = parse_model_ref(ref)
    try:
        if parsed.kind in ("runs", "models") and not parsed.is_run_weights:
            info = mlflow.models.get_model_info(ref)
            return (info.run_id, info.model_id) if info.run_id else None
        run_id = parsed.run_id or file_run_id
        if not run_id:
            return None
        mlflow.get_run(run_id)
        uri = logged_model_uri(run_id)
    except MlflowException:
        return None
    return run_id, parse_model_ref(uri).model_name if uri else None


def log_scores(
    uri: str,
    ref: str,
    metrics: Mapping[str, float],
    dataset: tuple[str, str],
    file_run_id: str = "",
) -> bool:
    """Log an evaluation's scores into the model's run, linked to the logged model (MLflow 3
    shows them on the model's page) and to the evaluated shards (``dataset``: the name and
    digest the run lists them under); False when the model has no MLflow run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    with tracking_uri(uri):
        found = model_run(ref, file_run_id)
    if found is None:
        return False
    run_id, model_id = found
    now = int(time.time() * 1000)
    name, digest = dataset
    entries = [
        Metric(
            k, v, now, 0, model_id=model_id, run_id=run_id, dataset_name=name, dataset_digest=digest
        )
        for k, v in metrics.items()
    ]
    client = MlflowClient(uri)  # the run keeps its status (mlflow.start_run would end it anew)
    for i in range(0, len(entries), 1000):
        client.log_batch(run_id, metrics=entries[i : i + 1000])
    return True
