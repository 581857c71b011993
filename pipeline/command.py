"""What every ``danet`` command shares: loading its params, one-line errors, signals.

Every command reads its params the same way (pipeline/config.py): ``--params FILE`` (default
params.yaml) or ``danet --preset NAME`` (configs/<name>.yaml), then ``--set section.key=value``
overrides, then the command's own options, which are shorthands for ``--set``; the params it
writes are checked against every store before anything runs (pipeline/stores.py).
"""

from __future__ import annotations

import json
import math
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.config import Params


def opt(help: str, min: int | None = None) -> Any:
    """An option whose value None means "not given": the params file's value stands."""
    return typer.Option(help=help, min=min)


def switch(name: str, help: str) -> Any:
    """A flag that is only ever turned on (``--restart``)."""
    return typer.Option(name, help=help)


# the options several commands share
ParamsOption = Annotated[Path, typer.Option("--params", help="params file (default params.yaml)")]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="override one param: section.key=value (repeatable), as dvc exp run -S"
    ),
]
FlipOption = Annotated[
    bool | None, typer.Option("--flip/--no-flip", help="add horizontally flipped predictions")
]
ModelOption = Annotated[str | None, opt("model.pt, MLflow run id, runs:/ or models:/ URI")]
ScalesOption = Annotated[str | None, opt("comma-separated scales, e.g. 0.5,0.75,1,1.25,1.5,1.75")]


class DanetGroup(TyperGroup):
    """Usage errors (an unknown option, a value out of range) as one ``error:`` line and exit 2,
    like every other bad input, instead of click's usage block."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, terminated)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored
                signal.signal(signal.SIGINT, interrupted)
        try:
            code = super().main(*args, **kwargs)
        except typer.Abort:
            typer.echo("aborted", err=True)
            raise SystemExit(130) from None
        except typer.TyperException as err:  # click's usage errors
            typer.echo(f"error: {err.format_message()}", err=True)
            raise SystemExit(getattr(err, "exit_code", 2)) from None
        raise SystemExit(code if isinstance(code, int) else 0)


def terminated(signum: int, frame: Any) -> None:
    """SIGTERM (``kill``, ``ray job stop``) unwinds like Ctrl-C: no half-written outputs."""
    if not after_imports(terminated, signum, frame):
        typer.echo("terminated", err=True)
        raise SystemExit(128 + signum)


def interrupted(signum: int, frame: Any) -> None:
    """Ctrl-C: KeyboardInterrupt, as Python's own handler raises it, once no import runs."""
    if not after_imports(interrupted, signum, frame):
        signal.default_int_handler(signum, frame)


def after_imports(handler: Any, signum: int, frame: Any) -> bool:
    """True, and ``handler`` called again 50 ms on, if the signal came while a module was being
    imported. An exception raised there inside a C extension's initialisation (matplotlib's
    agg backend importing numpy's C API, say) comes out as ``ImportError: initialization
    failed``, a traceback instead of the clean unwind; a stage imports its plotting and model
    libraries lazily, so a signal early in its writing often lands in one."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            signal.signal(signal.SIGALRM, lambda _, later: handler(signum, later))
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            return True
        frame = frame.f_back
    return False


@contextmanager
def one_line_errors() -> Iterator[None]:
    """A PipelineError, or a fault of the environment (a full disk, a locked MLflow database),
    -> ``error: <file or param>: <problem>`` on stderr and its exit code; a bug keeps its traceback."""
    from pipeline.faults import environment_fault

    try:
        yield
    except Exception as err:
        found = (
            err
            if isinstance(err, PipelineError)
            else environment_fault(err, LOADED.get("mlflow.tracking_uri", ""))
        )
        if found is None:
            raise
        typer.echo(f"error: {found.message}", err=True)
        raise typer.Exit(found.exit_code) from None


# what the running command loaded, for the one error line of a fault that does not carry it
LOADED: dict[str, str] = {}


def load(
    ctx: typer.Context,
    params: Path,
    sets: Sequence[str] | None,
    writes: Sequence[str] = (),
    *,
    overlay: Any = None,  # Any: the flags (**) may hold any value type
    **flags: Any,
) -> Params:
    """The command's params: file or preset, ``--set`` overrides, then its own options; the
    params it ``writes`` (``evaluate.out``) are checked to overlap no store (pipeline/stores.py).

    ``flags`` maps dotted keys (``shard.root``) to option values; None = not given.
    ``overlay``: sections' values over the params file, under ``--set`` (``danet train --refit``).
    """
    from pipeline.config import ConfigError, load_params
    from pipeline.stores import check_outputs

    preset = ctx.obj.get("preset") if ctx.obj else None
    if preset and params != Path("params.yaml"):
        raise ConfigError("--preset and --params name two params files: give one")
    overrides = list(sets or [])
    overrides += [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    p = load_params(params, overrides, preset, overlay)
    LOADED["mlflow.tracking_uri"] = p.mlflow.tracking_uri  # named by a fault of its database
    named = {k: getattr(getattr(p, k.split(".")[0]), k.split(".")[1]) for k in writes}
    check_outputs(p, {k: v for k, v in named.items() if v})  # "" = not given: the stage says so
    return p


@contextmanager
def stage(
    ctx: typer.Context,
    params: Path,
    sets: Sequence[str] | None,
    flags: Mapping[str, Any] | None = None,
    writes: Sequence[str] = (),
    overlay: Any = None,
) -> Iterator[Params]:
    """``with stage(...) as p:`` -- the command's params (:func:`load`), and its body's bad
    input as one line (:func:`one_line_errors`)."""
    with one_line_errors():
        yield load(ctx, params, sets, writes, overlay=overlay, **(flags or {}))


def print_report(report: Any, out: str | Path) -> None:
    """predict's and explain's report: failures on stderr, what was written; exit 1 if any failed."""
    errors, done = report.describe(out)
    if errors:
        typer.echo(errors, err=True)
    typer.echo(done)
    if report.failed:
        raise typer.Exit(1)


def tracking_uri(p: Params) -> str:
    from pipeline.mlflowstore import resolve_tracking_uri

    return resolve_tracking_uri(p.mlflow.tracking_uri)


def split_list(value: str | None) -> list[str] | None:
    return None if value is None else [s for s in value.split(",") if s]


def parse_scales(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        scales = [float(v) for v in value.split(",") if v]
    except ValueError:
        scales = [math.nan]
    if not all(map(math.isfinite, scales)):
        raise typer.BadParameter(
            f"must be finite numbers separated by commas, got {value!r}", param_hint="--scales"
        )
    return scales
