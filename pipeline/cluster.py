"""Where Ray runs: join a cluster or start a local Ray; where Ray Train stores its runs.

A shared leaf: training, the search and distributed evaluation connect through it.
"""

from __future__ import annotations

import os
import socket

from pipeline.errors import ConfigError, ServiceError, first_line
from pipeline.outputs import project_path


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
    """Ray's storage path: a URI (``s3://``, ``gs://``) as is, a local path made absolute against
    the project's root (workers and Tune trials run in other working directories, and a DVC
    experiment in a temporary copy of the project)."""
    return path if "://" in path else str(project_path(path))
