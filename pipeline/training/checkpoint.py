"""A training checkpoint: where a run stands, every rank's RNG states, the best weights so far and
the history; written by rank 0 into the folder Ray Train stores.

``state.pt`` holds the tensors (loaded with ``weights_only=True``), ``history.json`` the records.
Each checkpoint carries the best weights seen so far, so the newest checkpoint alone finishes a
run and Ray keeps only the ``train.checkpoints_to_keep`` newest ones. ``load_latest`` resumes from
the newest checkpoint that loads, and warns about each broken one it skips.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts.modelfile import save_bytes
from pipeline.errors import DataError, first_line
from pipeline.training.records import History

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
PROGRESS_FILE = "progress.json"  # small: where the run stands, read without loading the state
log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where a run stands: ``epoch`` is the epoch in progress, ``batch`` the batches done in it."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    epoch: int
    batch: int
    iteration: int
    rng: list[torch.Tensor]  # per rank: the CPU generator's state
    cuda_rng: list[torch.Tensor] = field(default_factory=list)  # per rank, on GPU runs
    best_model: dict[str, torch.Tensor] | None = None  # the weights of the best evaluation so far
    best_confusion: torch.Tensor | None = None  # its confusion matrix
    scaler: dict[str, Any] | None = None  # fp16's GradScaler state (its scale)
    recoveries: int = 0  # bad log windows recovered from so far (pipeline/training/recovery.py)
    loss_mean: float | None = None  # the running mean of the log windows' loss


def save_checkpoint(directory: Path, state: TrainState, history: History, max_iters: int) -> None:
    save_bytes(state.__dict__, directory / STATE_FILE)
    (directory / HISTORY_FILE).write_text(history.to_json())
    progress = {
        "iteration": state.iteration,
        "max_iters": max_iters,
        "epoch": state.epoch,
        "batch": state.batch,
    }
    (directory / PROGRESS_FILE).write_text(json.dumps(progress))


RESTART = "train the run again with --restart (its checkpoints are deleted)"


def load_checkpoint(
    directory: Path, device: torch.device | str = "cpu"
) -> tuple[TrainState, History]:
    """A checkpoint's state and history, verified: a missing, truncated or foreign file (a
    pickle that carries code included: tensors only are read) is a ``DataError`` naming it."""
    state_file, history_file = Path(directory) / STATE_FILE, Path(directory) / HISTORY_FILE
    try:
        raw = torch.load(state_file, map_location=device, weights_only=True)
        state = TrainState(**raw)
        if not isinstance(state.model, dict) or not isinstance(state.iteration, int):
            raise TypeError("not a training state")
    except FileNotFoundError:
        raise DataError(state_file, f"missing: {RESTART}") from None
    except Exception as err:  # torch's unpickler, a truncated zip, other keys: all one line
        raise DataError(
            state_file, f"not a checkpoint that loads ({first_line(err)}): {RESTART}"
        ) from None
    try:
        history = History.from_json(history_file.read_text())
    except FileNotFoundError:
        raise DataError(history_file, f"missing: {RESTART}") from None
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as err:
        raise DataError(
            history_file, f"not a run's history ({first_line(err)}): {RESTART}"
        ) from None
    return state, history


def _fs(location: str) -> tuple[Any, str]:
    """fsspec's filesystem of a run's storage (a local path or a bucket URI), its listings fresh:
    another process (a worker, a killed driver) writes there."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(location)
    fs.invalidate_cache()
    return fs, path


def checkpoint_dirs(run_dir: str) -> list[str]:
    """The run's checkpoint folders on its storage (a local path or a bucket URI), oldest first."""
    fs, path = _fs(run_dir)
    try:
        infos = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    names = sorted(
        name
        for name in (
            i["name"].rstrip("/").rsplit("/", 1)[-1] for i in infos if i["type"] == "directory"
        )
        if name.startswith("checkpoint_")
    )
    return [f"{run_dir.rstrip('/')}/{name}" for name in names]


def _read_json(location: str) -> Any:
    """The JSON file at ``location``, or None if it is missing or unreadable."""
    fs, path = _fs(location)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def finished_checkpoint(run_dir: str) -> str | None:
    """The run's newest checkpoint if it says the run reached its last iteration, else None."""
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        return None
    progress = _read_json(f"{dirs[-1]}/{PROGRESS_FILE}")
    done, total = (
        (progress.get(k) for k in ("iteration", "max_iters"))
        if isinstance(progress, dict)
        else (None, None)
    )
    if not (isinstance(done, int) and isinstance(total, int)):
        return None  # unreadable or foreign: the run is resumed, which verifies its files
    return dirs[-1] if done >= total else None


DIVERGED_FILE = "diverged.json"


def mark_diverged(run_dir: str, iteration: int, loss: float) -> None:
    """Rank 0 leaves where the run diverged in its folder for the driver (Ray Train V2 keeps only
    metrics reported with a checkpoint, and a raised error would be retried)."""
    fs, path = _fs(f"{run_dir.rstrip('/')}/{DIVERGED_FILE}")
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(json.dumps({"iteration": iteration, "loss": str(loss)}).encode())


def pop_diverged(run_dir: str) -> tuple[int, float] | None:
    """Where the run diverged, if it did (the mark is removed: a later run may try again)."""
    location = f"{run_dir.rstrip('/')}/{DIVERGED_FILE}"
    data = _read_json(location)
    if not isinstance(data, dict):
        return None
    fs, path = _fs(location)
    fs.rm_file(path)
    return int(data["iteration"]), float(data["loss"])


def delete_run(run_dir: str) -> None:
    """Every checkpoint and record of a run on its storage (``--restart``)."""
    fs, path = _fs(run_dir)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def prune_untracked(run_dir: str, kept: list[str]) -> None:
    """Delete the run's checkpoint folders other than ``kept`` (by folder name): those a driver
    killed before Ray registered them, which Ray's ``num_to_keep`` never deletes."""
    names = {Path(k).name for k in kept}
    for stale in checkpoint_dirs(run_dir):
        if Path(stale).name not in names:
            fs, path = _fs(stale)
            fs.rm(path, recursive=True)


def load_latest(
    latest: Any, run_dir: str, device: torch.device
) -> tuple[TrainState, History] | None:
    """The newest checkpoint of the run that loads, with a warning for each broken one skipped.

    Ray's latest (``latest``, or None) and the run's folders, which include those a killed
    driver wrote but never registered with Ray."""
    from ray.train import Checkpoint

    found = {Path(d).name: Checkpoint(d) for d in checkpoint_dirs(run_dir)}
    if latest is not None:
        found[Path(latest.path).name] = latest
    # newest first (the names are timestamps): a folder written after Ray's latest, before the
    # driver stopped, holds later progress
    for _, checkpoint in sorted(found.items(), reverse=True):
        try:
            with checkpoint.as_directory() as directory:
                return load_checkpoint(Path(directory), device)
        # a half-written or corrupt checkpoint (any reader's error): fall back to the one before
        except Exception as err:
            log.warning(
                "checkpoint %s does not load (%s): trying the one before",
                checkpoint.path,
                first_line(err),
            )
    return None
