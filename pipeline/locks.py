"""Exclusive locks, so that two commands never write one store at once.

A location is locked with ``flock`` on a file in the user's cache named after it: the kernel releases it
when the holder exits, however it exits (Ctrl-C, SIGKILL, a crash), so a later command just
proceeds. An object-store location (``s3://``) also gets a lease object beside it, created only
if absent (S3's conditional ``If-None-Match`` PUT, through fsspec's ``xb`` mode) and removed at
the end; a lease left by a killed process on this host is taken over, one from another host is
reported with how to remove it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from pipeline.errors import ServiceError
from pipeline.locations import is_url

log = logging.getLogger(__name__)
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "danet" / "locks"


def lock_file(location: str) -> Path:
    """The local file whose flock stands for ``location``: in this user's cache, named by a
    digest of the location, so that no store gets a file it did not have."""
    key = location if is_url(location) else str(Path(location).resolve())
    return CACHE / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".lock")


@contextmanager
def exclusive(location: str, holder: str, wait: bool = False, lease: bool = True) -> Iterator[None]:
    """Hold ``location`` for the block. Another holder: wait for it (``wait``) or raise a
    ``ServiceError`` naming ``holder`` (what the other process is, e.g. ``train.run_name X``).
    ``lease=False``: a URL that is not an object store (an MLflow server) is locked on this
    host only; what guards it across hosts is the caller's own (a compare-and-set)."""
    path = lock_file(location)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # noqa: SIM115 -- held for the block, closed below
    except OSError as err:
        raise ServiceError(f"{path}: cannot create the lock ({err.strerror or err})") from None
    try:
        _flock(handle, path, holder, wait)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        handle.flush()
        with _lease(location, holder) if lease and is_url(location) else _nothing():
            yield
    finally:
        handle.close()  # releases the flock


def _flock(handle: IO[str], path: Path, holder: str, wait: bool) -> None:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.seek(0)
        other = handle.read().strip() or "another process"
        raise ServiceError(
            f"{holder}: another danet command is writing it now ({other}; lock {path}): "
            "wait for it to finish, then run again"
        ) from None


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _lease(location: str, holder: str) -> Iterator[None]:
    """A lease object ``<location>.lock`` in the object store, for commands on other hosts."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(location)
    key = root.rstrip("/") + ".lock"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    for attempt in range(2):
        try:
            with fs.open(key, "xb") as f:
                f.write(json.dumps(me).encode())
            break
        except FileExistsError:
            other = _read_lease(fs, key)
            if attempt == 0 and _stale(other):
                log.warning("%s: taking over the lease of a process that is gone (%s)", key, other)
                fs.rm_file(key)
                continue
            raise ServiceError(
                f"{holder}: another danet command holds its lease {location}.lock ({other}); "
                "if that process is gone, delete the lease object and run again"
            ) from None
    try:
        yield
    finally:
        try:
            fs.rm_file(key)
        except OSError as err:  # the store went away: the lease stays, named for a later run
            log.warning("%s: lease not removed (%s)", key, err)


def _read_lease(fs: object, key: str) -> dict[str, object]:
    try:
        with fs.open(key, "rb") as f:  # type: ignore[attr-defined]
            data = json.loads(f.read())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _stale(lease: dict[str, object]) -> bool:
    """A lease of this host whose process no longer runs."""
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    try:
        os.kill(int(lease["pid"]), 0)  # type: ignore[call-overload]
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
