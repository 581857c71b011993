"""Outputs appear atomically: written into a temporary sibling, moved into place when complete.

Every stage writes through these helpers, so an interrupted or failed run leaves the previous
output as it was, an output can never replace one of the stage's own inputs, and a folder that
is not the stage's own (a user's, with files the stage never writes) is refused, not replaced.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path

from pipeline.errors import ConfigError, ServiceError
from pipeline.locations import is_url


def writer_id() -> str:
    """``<host>-<pid>`` of this process: what a later run checks to tell a killed writer's debris
    (temporary files, a PENDING logged model) from a live writer's."""
    return f"{_host()}-{os.getpid()}"


def dead_writer(writer: str) -> bool:
    """Was ``writer`` (a ``writer_id``) a process of this host that no longer runs?"""
    host, _, pid = writer.partition("-")
    return host == _host() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))


def _host() -> str:
    import hashlib
    import socket

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def tmp_prefix(out: Path) -> str:
    """The temporary sibling's name prefix: ``.<name>.tmp-<host>-<pid>-``, so that a later run
    can tell its own command's debris (a killed writer's) from a live writer's."""
    return f".{out.name}.tmp-{_host()}-{os.getpid()}-"


def sweep_stale(out: Path) -> None:
    """Delete the temporary files and folders beside ``out`` (of any output's name: a killed
    export to another file name leaves one too) that a process of this host wrote and that no
    longer runs (a SIGKILLed command's); a live writer's stay."""
    mark = f".tmp-{_host()}-"
    try:
        found = [p for p in out.parent.glob(f".*{mark}*") if mark in p.name]
    except OSError:
        return
    for path in found:
        pid = path.name.split(mark, 1)[1].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out``; it replaces ``out`` when the block ends
    without error, and is removed otherwise (an interrupted run leaves the old ``out`` as it was)."""
    out = Path(out)
    prefix, done = tmp_prefix(out), False
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            sweep_stale(out)
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
        except OSError as err:
            raise ServiceError(
                f"{out}: cannot write the output here ({err.strerror or err})"
            ) from None
        yield tmp
        replace_dir(tmp, out)
        done = True
    except OSError as err:
        name_output(err, out)
        raise
    finally:  # by its prefix (this process's): also a folder made as Ctrl-C came in
        for left in [] if done else out.parent.glob(f"{glob.escape(prefix)}*"):
            remove_tree(left)


def remove_tree(path: Path, tries: int = 20) -> None:
    """``rmtree`` until nothing is left: on Ctrl-C a stage's worker processes (danet shard's
    encoders) may still be writing into the folder while it is removed."""
    import time

    for _ in range(tries):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.1)


def replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; the old ``target`` disappears only once ``new`` is in place.
    Two commands finishing the same output at once take turns (a lock): the last one wins, whole."""
    from pipeline.locks import exclusive

    with exclusive(str(target), str(target), wait=True):
        if target.exists() and not target.is_dir():
            raise ConfigError(f"{target}: exists and is not a folder")
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if target.exists():
            target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); it becomes ``path`` on success."""
    path = Path(path)
    prefix, done = tmp_prefix(path), False
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            sweep_stale(path)
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=path.suffix)
        except OSError as err:
            raise ServiceError(f"{path}: cannot write here ({err.strerror or err})") from None
        os.close(fd)
        yield Path(name)
        os.replace(name, path)
        done = True
    except OSError as err:
        name_output(err, path)
        raise
    finally:  # by its prefix (this process's): also a file made as Ctrl-C came in; a write
        # that succeeded left nothing (no second scan of the folder per output file)
        for left in [] if done else path.parent.glob(f"{glob.escape(prefix)}*"):
            if left.is_file() or left.is_symlink():
                left.unlink(missing_ok=True)


def name_output(err: OSError, out: Path) -> None:
    """A write's error without a file name (``write()`` on a full disk) names the output."""
    if err.filename is None:
        err.filename = str(out)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary sibling and ``os.replace``."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def project_path(path: str | Path) -> Path:
    """A path of the project's own stores (MLflow's SQLite file, Ray's results): relative ones
    resolve against the project's root, which DVC names in DVC_ROOT also when an experiment runs
    in a temporary copy (``dvc exp run --temp``, ``--queue``), so its runs land in the real stores."""
    path = Path(path)
    if path.is_absolute():
        return path
    return (Path(os.environ.get("DVC_ROOT") or Path.cwd()) / path).resolve()


def check_output(out: str | Path, name: str) -> None:
    """Refuse, before any work, an output folder that cannot be one: a file in its place, or a
    parent folder that cannot be written (``name`` is the param that names it)."""
    if is_url(out):
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{name} {out}: exists and is not a folder")
    check_writable(next((p for p in [path, *path.parents] if p.exists()), Path(".")), out, name)


def check_own(out: str | Path, name: str, stage: str, writes: Sequence[str]) -> None:
    """Refuse, before any work, an existing folder that is not the stage's own: one holding a
    file or folder whose name matches none of ``writes`` (``fnmatch`` patterns of every name
    the stage writes there: ``metrics.json``, ``*_mask.png``). A stage replaces its output
    folder whole (``atomic_dir``) or writes into it: a user's folder given by mistake (or
    another stage's output) is never emptied, replaced or written into. ``stage`` names the
    command in the message."""
    if is_url(out) or not Path(out).is_dir():
        return
    found = foreign_names((p.name for p in Path(out).iterdir()), writes)
    refuse_foreign(
        f"{name} {out}:", found, stage, "not its output folder; choose a new or empty one"
    )


def foreign_names(names: Iterable[str], writes: Sequence[str | re.Pattern[str]]) -> list[str]:
    """The ``names`` that match none of ``writes`` (``fnmatch`` patterns, or regular expressions
    for names a pattern cannot say), sorted: what a stage did not write into its folder."""

    def written(name: str) -> bool:
        return any(
            w.fullmatch(name) if isinstance(w, re.Pattern) else fnmatchcase(name, w) for w in writes
        )

    return sorted(n for n in names if not written(n))


def refuse_foreign(where: str, found: Sequence[str], stage: str, remedy: str) -> None:
    """The one refusal of a folder that holds what ``danet <stage>`` does not write (``found``,
    from ``foreign_names``), for output folders here and Ray storage folders (pipeline/cluster.py):
    such a folder is a user's, never emptied, replaced, deleted or written into."""
    if found:
        raise ConfigError(
            f"{where} holds what danet {stage} does not write ({listed(found)}): {remedy}"
        )


def listed(names: Sequence[str], shown: int = 3) -> str:
    """The first ``shown`` names, comma-separated, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_file_output(out: str | Path, name: str) -> None:
    """``check_output`` for an output file: a folder in its place, or an unwritable parent."""
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"{name} {out}: is a folder, not a file")
    check_writable(next((p for p in path.parents if p.exists()), Path(".")), out, name)


def check_writable(parent: Path, out: str | Path, name: str) -> None:
    """The nearest existing folder of an output must be a folder this process can write."""
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ServiceError(f"{name} {out}: cannot write here ({parent} is not a writable folder)")


def check_outside(out: str | Path, inputs: Mapping[str, str | Path]) -> None:
    """Refuse an output equal to, inside or containing one of the stage's inputs.

    ``inputs`` maps a param name (``shard.root``) to the path it names; URLs are not checked.
    Called before anything is written, so the inputs are never touched.
    """
    if is_url(out):
        return
    target = Path(out).resolve()
    for name, value in inputs.items():
        if not value or is_url(value):
            continue
        source = Path(value).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise ConfigError(f"the output {out} overlaps the input {name} {value}: choose another")
