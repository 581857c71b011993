"""Faults of the environment, told apart from bugs by their type, never by their text.

A full disk, a read-only or forbidden folder, a corrupted or locked MLflow database, an object
store that cannot be reached or has no credentials for us: none is a bug in the pipeline, so
each becomes a ``ServiceError`` (one line, exit 2) wherever it surfaces.
Any other exception keeps its traceback.
"""

from __future__ import annotations

import errno
import os

from pipeline.errors import ServiceError, cause_chain, first_line
from pipeline.mlflowstore import configured_uri

# errno values that describe the machine, not the code
ENVIRONMENT = {
    errno.ENOSPC: "no space left on the device: free some and run again",
    errno.EDQUOT: "disk quota exceeded: free some space and run again",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error on the device",
    errno.EMFILE: "too many open files (raise ulimit -n)",
}


def _database_error(err: BaseException) -> bool:
    try:
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:  # pragma: no cover - mlflow brings it
        return False
    return isinstance(err, SQLAlchemyError)


def _object_store_error(err: BaseException) -> str | None:
    """What is wrong with an object store that cannot be reached or will not let us in."""
    try:
        from botocore import exceptions as boto
    except ImportError:  # pragma: no cover - s3fs brings it
        return None
    if isinstance(err, boto.EndpointConnectionError | boto.ConnectTimeoutError):
        return "the object store cannot be reached (check AWS_ENDPOINT_URL and the network)"
    if isinstance(err, boto.NoCredentialsError | boto.PartialCredentialsError):
        return "no credentials for the object store (set AWS_ACCESS_KEY_ID and its secret)"
    return None


def environment_fault(err: BaseException, tracking_uri: str = "") -> ServiceError | None:
    """The ``ServiceError`` an environment fault stands for (searching its causes), else None;
    a database fault names ``tracking_uri`` (MLFLOW_TRACKING_URI first, as MLflow reads it)."""
    for cause in cause_chain(err):
        if isinstance(cause, OSError) and cause.errno in ENVIRONMENT:
            where = cause.filename or "an output"
            return ServiceError(f"{where}: {ENVIRONMENT[cause.errno]} ({os.strerror(cause.errno)})")
        if (problem := _object_store_error(cause)) is not None:
            return ServiceError(f"{first_line(cause)}: {problem}")
        if _database_error(cause):
            uri = configured_uri(tracking_uri)
            where = f"mlflow.tracking_uri {uri}" if uri else "mlflow.tracking_uri"
            orig = getattr(cause, "orig", None) or cause
            return ServiceError(
                f"{where}: the MLflow database cannot be used ({type(orig).__name__}: "
                f"{first_line(orig)}); if it is locked, wait for the other process; if it is "
                "corrupt, restore it from a backup"
            )
    return None
