"""The project's modules and what they import, read from the source (``ast``), never imported.

One implementation for the two questions asked of the code: which files a module runs (a DVC
stage's deps, checked by tests/test_layout.py) and which files decide a training run's weights
(its code identity, pipeline/training/job.py); and the git commit the code is at (``git_state``).
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable
from functools import cache
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
PACKAGES = ("danet", "pipeline")


def module_file(name: str, root: Path = PROJECT) -> Path | None:
    """The file of module ``name`` under ``root`` (a package's ``__init__.py``), if any."""
    path = root / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def module_name(path: Path, root: Path = PROJECT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _parse(path: Path, stamp: tuple[int, int]) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _nodes(tree: ast.AST, type_checking: bool) -> Iterable[ast.AST]:
    """Every node of ``tree``; the bodies of ``if TYPE_CHECKING:``, which never run, only with
    ``type_checking``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if (
            not type_checking
            and isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.unparse(node.test)
        ):
            todo += node.orelse
        else:
            todo += ast.iter_child_nodes(node)


def imports(path: Path, root: Path = PROJECT, type_checking: bool = False) -> frozenset[str]:
    """Every project module ``path`` imports, at module level or inside a function; those for
    type checkers only (which never run) with ``type_checking``."""
    stat = path.stat()
    found = set()
    for node in _nodes(_parse(path, (stat.st_mtime_ns, stat.st_size)), type_checking):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        for name in names:
            if name.split(".")[0] in PACKAGES and (file := module_file(name, root)) is not None:
                found.add(module_name(file, root))
    return frozenset(found)


def closure(
    modules: Iterable[str], root: Path = PROJECT, stop: Iterable[str] = (), packages: bool = True
) -> set[Path]:
    """The files ``modules`` run: their imports, theirs, and (``packages``) the packages they
    live in; the modules in ``stop`` and what only they import are left out."""
    cut = set(stop)
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        path = module_file(name, root)
        if path is None or path in seen or module_name(path, root) in cut:
            continue
        seen.add(path)
        name = module_name(path, root)
        if packages:
            todo += [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += imports(path, root)
    return seen


def git_state() -> tuple[str, bool]:
    """The project's git commit and whether its working tree differs from it ("unknown", False
    outside a repository). ``dvc.lock`` does not count: ``dvc repro`` rewrites it as the stages
    run, so it records this pipeline's results, not what they were made from."""
    import subprocess

    root = os.environ.get("DVC_ROOT") or os.getcwd()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    changed = [line for line in status.stdout.splitlines() if Path(line[3:]).name != "dvc.lock"]
    return commit.stdout.strip(), bool(changed)
