"""Where Ray runs: join a cluster or start a local Ray; where Ray Train stores its runs.

A shared leaf: training, the search and distributed evaluation connect through it.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

from pipeline.errors import ConfigError, ServiceError, first_line
from pipeline.locations import is_url
from pipeline.outputs import project_path


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
