"""The exception root of the pipeline: bad input or an unusable environment, never a bug.

The CLI turns a ``PipelineError`` into one line on stderr (``error: <what>: <problem>``) and exit
code 2; every other exception is a bug and keeps its traceback. Messages name the file or param
and the problem on one line. Every class pickles with its arguments, so an error raised in a
worker process (a process pool, a Ray worker) arrives in the driver as itself.
"""

from __future__ import annotations

from pathlib import Path


class PipelineError(Exception):
    """Bad input or environment; the message names the file or param and what is wrong."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class ConfigError(PipelineError):
    """An invalid, unknown or missing param (``train.lr must be > 0, got -1``)."""


class DataError(PipelineError):
    """A bad input file: a sample, a label, a shard, a manifest (``<path>: <problem>``)."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.path, self.problem))


class ModelError(DataError):
    """A model file or reference that cannot be used (missing, corrupt, foreign, mismatched)."""


class ServiceError(PipelineError):
    """Ray, MLflow or a storage location that cannot be reached or written."""


class TrainingFailed(PipelineError):
    """Every trial of a search failed: the recipe or the data, not the code (exit 2)."""


class TrainingError(PipelineError):
    """Training stopped after its retries for a reason outside the code (a worker or node lost)."""

    exit_code = 1


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite: the recipe cannot learn as it is (exit 2)."""

    def __init__(self, iteration: int, loss: float) -> None:
        super().__init__(
            f"training diverged: the loss is {loss} at iteration {iteration}; lower train.lr "
            "or set train.grad_clip (e.g. 1.0) and train again"
        )
        self.iteration, self.loss = iteration, loss

    def __reduce__(self) -> tuple[type, tuple[int, float]]:
        return (type(self), (self.iteration, self.loss))


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's text, or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def cause_chain(err: BaseException) -> list[BaseException]:
    """``err`` and what it was raised from or during, outermost first (each once)."""
    seen: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen
