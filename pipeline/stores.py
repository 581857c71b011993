"""Every location the pipeline owns or reads, and the one check each stage makes before writing.

An output must not equal, contain or lie inside another store -- the shards, Ray's run storage,
the MLflow database and its artifacts, the other stages' outputs, the dataset root, DVC's cache,
the git repository's tracked files -- so a mistyped ``--out`` or run name can never replace
them. The check runs before anything is written; a refusal is one line naming both params.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from pipeline.config import Params
from pipeline.errors import ConfigError
from pipeline.locations import is_url
from pipeline.mlflowstore import local_paths
from pipeline.modelrefs import parse_model_ref
from pipeline.outputs import project_path


def repository_root() -> Path | None:
    """The git repository the command runs in (DVC_ROOT first: an experiment's temporary copy)."""
    start = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    return next((p for p in (start, *start.parents) if (p / ".git").exists()), None)


def locations(p: Params) -> dict[str, str]:
    """Param name -> the location it names, for every store of the pipeline (empty ones left out)."""
    found = {
        "shard.out": p.shard.out,
        "shard.root": p.shard.root if p.shard.dataset != "synthetic" else "",
        "data.shards": p.data.shards,
        "evaluate.shards": p.evaluate.shards,
        "train.storage_path": p.train.storage_path
        if is_url(p.train.storage_path)
        else str(project_path(p.train.storage_path)),
        "train.out": p.train.out,
        "tune.out": p.tune.out,
        "evaluate.out": p.evaluate.out,
        "register.out": p.register.out,
        "register.eval_metrics": p.register.eval_metrics,
    }
    found |= {"synthetic.out": p.synthetic.out, "predict.out": p.predict.out}
    for key, model in (("evaluate.model", p.evaluate.model), ("predict.model", p.predict.model)):
        if model != "auto" and parse_model_ref(model).kind in ("file", "onnx"):
            found[key] = model if Path(model).exists() else ""
    found |= local_paths(p.mlflow.tracking_uri)
    if (root := repository_root()) is not None:
        found["the git repository"] = str(root / ".git")
        # the cache, not all of .dvc: experiments run in copies under .dvc/tmp/exps and write
        # their outputs there; .dvc/config is tracked, so git's check keeps it
        found["DVC's cache"] = str(root / ".dvc" / "cache")
    return {k: v for k, v in found.items() if v}


def _norm(value: str) -> PurePosixPath | tuple[str, PurePosixPath]:
    if is_url(value):
        scheme, _, rest = value.partition("://")
        return (scheme, PurePosixPath("/" + rest.strip("/")))
    return PurePosixPath(Path(value).resolve())


def inside(a: str, b: str) -> bool:
    """Whether location ``a`` is ``b`` or lies inside it (a path, or a URL of the same scheme)."""
    x, y = _norm(a), _norm(b)
    if isinstance(x, tuple) or isinstance(y, tuple):
        if not (isinstance(x, tuple) and isinstance(y, tuple)) or x[0] != y[0]:
            return False
        x, y = x[1], y[1]
    return x == y or y in x.parents


def overlaps(a: str, b: str) -> bool:
    """Whether two locations are equal or one lies inside the other."""
    return inside(a, b) or inside(b, a)


# What later stages read from an output: the shards from shard.out, the model from train.out or
# tune.out, the metrics from evaluate.out. They may lie inside it; nothing else may.
READ_FROM = {
    "shard.out": ("data.shards", "evaluate.shards"),
    "train.out": ("evaluate.model",),
    "tune.out": ("evaluate.model",),
    "evaluate.out": ("register.eval_metrics",),
}


def check_outputs(
    p: Params, outputs: Mapping[str, str], inputs: Mapping[str, str] | None = None
) -> None:
    """Refuse, before anything is written, an output (param name -> location) that overlaps any
    store of ``p`` or any of ``inputs``, or holds files the git repository tracks."""
    stores = {**locations(p), **(inputs or {})}
    for name, out in outputs.items():
        for other, location in stores.items():
            if other == name or (other in READ_FROM.get(name, ()) and inside(location, out)):
                continue
            if overlaps(out, location):
                raise ConfigError(
                    f"{name} {out} overlaps {other} {location}: choose another location"
                )
        if not is_url(out):
            _check_untracked(Path(out), name)


def _check_untracked(out: Path, name: str) -> None:
    """An output may not replace files git tracks (the code, params.yaml, dvc.lock)."""
    root = repository_root()
    target = out.resolve()
    if root is None or not (target == root or root in target.parents or target in root.parents):
        return
    if target in root.parents or target == root:
        raise ConfigError(f"{name} {out}: is the repository itself: choose a folder inside it")
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--", str(target)],
            cwd=root,
            capture_output=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return  # no git here: the other checks still hold
    if listed:
        first = listed.split(b"\0")[0].decode(errors="replace")
        raise ConfigError(f"{name} {out}: holds files the git repository tracks ({first})")
