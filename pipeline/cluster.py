"""Where Ray runs: join a cluster or start a local Ray; where Ray Train stores its runs.

A shared leaf: training, the search and distributed evaluation connect through it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, ServiceError, first_line
from pipeline.locations import is_url
from pipeline.outputs import foreign_names, project_path, refuse_foreign

log = logging.getLogger(__name__)


def ray_address(address: str) -> str:
    """The cluster to use: ``train.ray_address``, else RAY_ADDRESS, else "" (a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS", "")


def is_remote(address: str) -> bool:
    """A cluster that may span other machines: an explicit address of another host (``auto``
    and ``127.0.0.1``/``localhost`` are this machine's own ``ray start``)."""
    if not address or address in ("auto", "local"):
        return False
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return host not in ("127.0.0.1", "localhost", "::1", "[::1]")


def check_tracking_for(address: str, tracking_uri: str) -> None:
    """On a cluster, rank 0 may run on another node: a SQLite file or a folder there is not the
    driver's, and SQLite's locking is unsafe on a network file system. A server is needed."""
    if is_remote(ray_address(address)) and not tracking_uri.startswith(
        ("http://", "https://", "databricks")
    ):
        raise ConfigError(
            f"mlflow.tracking_uri {tracking_uri}: a local store cannot serve a Ray cluster "
            f"({ray_address(address)}); run `mlflow server` and point mlflow.tracking_uri at it"
        )


def shipped_code() -> dict[str, list[str]]:
    """A runtime_env that ships danet/ and pipeline/ to the cluster's nodes (they need only the
    dependencies installed), unless this driver already runs as a Ray job with its working_dir."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return {}
    root = Path(__file__).resolve().parents[1]
    return {"py_modules": [str(root / "danet"), str(root / "pipeline")]}


def connect_ray(address: str, num_cpus: int | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS); otherwise start a local Ray sized to this machine."""
    import ray

    address = ray_address(address)
    explicit = address not in ("", "auto", "local")
    if explicit:
        _probe(address)
    if ray.is_initialized():
        return
    # ray.init puts its own SIGTERM handler in place (it aborts the process); keep ours, which
    # unwinds like Ctrl-C so that no half-written output stays behind (pipeline/cli.py)
    on_main = threading.current_thread() is threading.main_thread()
    ours = signal.getsignal(signal.SIGTERM) if on_main else None
    try:
        if explicit:
            ray.init(address=address, log_to_driver=True, runtime_env=shipped_code())
        elif address:
            ray.init(address=address, log_to_driver=True)
        else:
            if others := other_local_ray():
                log.warning(
                    "another Ray instance runs on this machine (GCS pid %s): its work competes "
                    "for the CPUs this one counts as its own; join it with --address auto or stop "
                    "it (ray stop)",
                    ", ".join(map(str, others)),
                )
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
    if callable(ours):
        signal.signal(signal.SIGTERM, ours)


# Ray Train V2 retries a worker group that cannot start (not placed within
# RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default) without end unless
# FailureConfig.controller_failure_limit bounds it (ray/train/v2/api/config.py): these many.
START_RETRIES = 2


def check_fits(address: str, train: Any) -> None:
    """Each Train worker of ``train`` (its CPUs, its GPU share) must fit on one node, and the
    group on the cluster: a request the cluster can never meet would wait forever. Checked
    against the connected cluster, or before a local Ray starts against this machine."""
    nodes = _node_resources(address)
    if not nodes:
        return
    need = {"CPU": ("train.cpus_per_worker", float(train.cpus_per_worker))}
    if train.use_gpu:
        need["GPU"] = ("train.gpus_per_worker", float(train.gpus_per_worker))
    for resource, (param, amount) in need.items():
        largest = max(n.get(resource, 0.0) for n in nodes)
        if amount > largest:
            raise ConfigError(
                f"{param} {amount:g}: no node of the Ray cluster has {amount:g} {resource} "
                f"(the largest has {largest:g}): lower it (tune.{resource.lower()}s_per_trial "
                "for a search) or add a node that has them"
            )
    total = sum(n.get("CPU", 0.0) for n in nodes)
    if train.num_workers * train.cpus_per_worker > total:
        raise ConfigError(
            f"train.num_workers {train.num_workers} x train.cpus_per_worker "
            f"{train.cpus_per_worker}: the Ray cluster has {total:g} CPUs in all: lower them or "
            "add nodes"
        )


def _node_resources(address: str) -> list[dict[str, float]]:
    """Each alive node's resources; for a local Ray not started yet, this machine's."""
    import ray

    if ray.is_initialized():
        return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    if ray_address(address):
        return []  # a cluster not joined yet: checked once connected
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}]


def other_local_ray() -> list[int]:
    """The pids of Ray instances already running on this machine (their GCS servers) that are
    not this process's own: trials share the machine's CPUs with them."""
    import psutil

    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid", "name", "ppid"]):
        try:
            if proc.info["name"] == "gcs_server" and proc.info["ppid"] != me:
                found.append(int(proc.info["pid"]))
        except (psutil.Error, TypeError):
            continue
    return found


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
    """Ray's storage path: a URI (``s3://``, ``gs://``) as is, a local path made absolute against
    the project's root (workers and Tune trials run in other working directories, and a DVC
    experiment in a temporary copy of the project)."""
    return path if is_url(path) else str(project_path(path))


# --- one namespace under train.storage_path: runs, searches and their trials -----------------

TRIALS = "-trials"  # a search's trials live in <storage>/<search><TRIALS>/


# What each stage writes there (Ray Train V2's, Ray Tune's, ours): fnmatch patterns of names, a
# regex where a pattern cannot say it, as for check_own (pipeline/outputs.py). A folder holding
# anything else is a user's, never deleted (--restart) nor trained into.
TRIAL_ID = r"[0-9a-f]+(?:_[0-9]+)?"  # Tune's: 5 hex + _00000 (random search), 8 hex (Optuna)
RUN_WRITES = (
    "checkpoint_?*",  # Ray Train's checkpoint folders
    "checkpoint_manager_snapshot.json",
    ".validate_storage_marker",
    "diverged.json",  # pipeline/training/checkpoint.py's DIVERGED_FILE
)
SEARCH_WRITES = (
    "tuner.pkl",
    "experiment_state-?*.json",
    "basic-variant-state-?*.json",
    "search_gen_state-?*.json",
    "searcher-state-?*.pkl",
    ".?*-tmp-?*",  # Tune's atomic saves (a temporary file a killed driver left)
    ".validate_storage_marker",
    re.compile(TRIAL_ID),  # a trial's folder (results, params)
)


def _entries(folder: str) -> list[str] | None:
    """The names in a storage folder (local or a bucket URI); [] when it does not exist, None
    when it is a file."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(folder)
    fs.invalidate_cache()
    try:
        if fs.isfile(path):
            return None
        return [str(i).rstrip("/").rsplit("/", 1)[-1] for i in fs.ls(path, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def folder_kind(folder: str) -> str:
    """What a folder under the storage holds: "search" (Tune's experiment state), "run" (a Train
    run's checkpoints), "trials" (runs of a search's trials) or "" (nothing recognised)."""
    names = _entries(folder) or []
    if any(n == "tuner.pkl" or n.startswith("experiment_state-") for n in names):
        return "search"
    if any(n.startswith("checkpoint_") for n in names):
        return "run"
    if folder.rstrip("/").endswith(TRIALS) and names:
        return "trials"
    return ""


def foreign(folder: str, writes: tuple[str | re.Pattern[str], ...]) -> list[str] | None:
    """The names in ``folder`` that match none of ``writes``, sorted; None when it is a file."""
    names = _entries(folder)
    return None if names is None else foreign_names(names, writes)


def foreign_trials(folder: str, search: str) -> list[str] | None:
    """``foreign`` for a search's trials folder: each entry a trial's run folder
    (``<search>-<trial id>``, pipeline/training/trial.py's ``trial_run_name``) holding only
    what Ray Train writes (its foreign names shown as ``<trial>/<name>``)."""
    trial = re.escape(search) + "-" + TRIAL_ID
    found = foreign(folder, (re.compile(trial),))
    if found is None:
        return None
    for name in sorted(set(_entries(folder) or []) - set(found)):
        inside = foreign(f"{folder}/{name}", RUN_WRITES)
        found += [name] if inside is None else [f"{name}/{n}" for n in inside]
    return sorted(found)


def check_own_folder(folder: str, found: list[str] | None, param: str, what: str) -> None:
    """Refuse, before anything is deleted or started, a storage folder that is not the stage's
    own (``found``: its foreign names; None: a file). ``param`` is ``train.run_name 'x'``
    or ``tune.name 'x'``; ``what`` the folder (``run``, ``search``, ``trials``)."""
    stage, choose = ("tune", "search name") if param.startswith("tune") else ("train", "run name")
    if found is None:
        raise ConfigError(
            f"{param}: {folder} is a file, not a {what} folder; choose another {choose}"
        )
    refuse_foreign(
        f"{param}: {folder}", found, stage, f"not its {what} folder; choose another {choose}"
    )


def check_run_name(storage: str, name: str) -> None:
    """A training run's folder must be its own (``--restart`` deletes it, a run writes into it):
    not a search's or its trials', not a user's folder."""
    folder = f"{storage}/{name}"
    kind = folder_kind(folder)
    if name.endswith(TRIALS) or kind in ("search", "trials"):
        what = "a search's folder" if kind == "search" else "a search's trials folder"
        raise ConfigError(
            f"train.run_name {name!r}: {folder} is {what} (runs and searches share "
            f"train.storage_path; a name ending in {TRIALS} is a search's): choose another run name"
        )
    check_own_folder(folder, foreign(folder, RUN_WRITES), f"train.run_name {name!r}", "run")


def check_search_name(storage: str, name: str) -> None:
    """A search's folders (``<name>``, ``<name>-trials``) must be its own (``--restart`` deletes
    them, the search writes into them): not a training run's, not a user's folder."""
    if name.endswith(TRIALS):
        raise ConfigError(
            f"tune.name {name!r}: a name ending in {TRIALS} is another search's trials folder: "
            "choose another search name"
        )
    for folder in (f"{storage}/{name}", f"{storage}/{name}{TRIALS}"):
        if folder_kind(folder) == "run":
            raise ConfigError(
                f"tune.name {name!r}: {folder} is a training run's folder (runs and searches "
                "share train.storage_path): choose another search name"
            )
    param = f"tune.name {name!r}"
    check_own_folder(
        f"{storage}/{name}", foreign(f"{storage}/{name}", SEARCH_WRITES), param, "search"
    )
    trials = f"{storage}/{name}{TRIALS}"
    check_own_folder(trials, foreign_trials(trials, name), param, "trials")
