"""The codebase keeps its shape: layers, no import cycle, small pieces, and a dvc.yaml that tells
the truth about each stage's code and params (derived from the imports and Params here)."""

from __future__ import annotations

import ast
import dataclasses
from functools import cache
from pathlib import Path

import pytest
import yaml

from pipeline import codebase
from pipeline.config import Params

ROOT = codebase.PROJECT
PACKAGES = codebase.PACKAGES
imports, module_name = codebase.imports, codebase.module_name
# A stage's core module: its command only parses params and calls it.
STAGES = {
    "shard": "pipeline.data.shard",
    "train": "pipeline.training.driver",
    "tune": "pipeline.training.search",
    "evaluate": "pipeline.evaluation.evaluate",
    "register": "pipeline.registry.register",
}
# Layers in the order one image travels; a module imports only from its own layer or earlier ones.
LAYERS = (
    ("danet",),
    (
        "pipeline",
        "pipeline.errors",
        "pipeline.config",
        "pipeline.logs",
        "pipeline.outputs",
        "pipeline.pictures",
        "pipeline.cluster",
        "pipeline.faults",
        "pipeline.locks",
        "pipeline.stores",
        "pipeline.codebase",
        "pipeline.devices",
    ),
    ("pipeline.data",),
    ("pipeline.artifacts",),
    ("pipeline.training",),
    ("pipeline.evaluation",),
    ("pipeline.registry",),
    ("pipeline.use",),
    ("pipeline.command", "pipeline.cli", "pipeline.__main__"),
)
# Keys that do not change any stage's outputs: where a stage runs or writes, how often it logs,
# where MLflow lives, how runs are named; output paths are outs, input paths deps.
NOT_OUTPUT_KEYS = {
    "synthetic.out",  # danet synthetic's folder dataset (images to predict), not the shards
    "synthetic.splits",
    "synthetic.count",
    "shard.workers",
    "shard.out",
    "data.shards",
    "train.ray_address",
    "train.log_every",
    "train.storage_path",
    "train.out",
    "train.run_name",
    "train.max_failures",
    "train.checkpoints_to_keep",
    "train.cpus_per_worker",
    "train.gpus_per_worker",  # a share of a GPU or a whole one: the same computation
    "train.placement_strategy",
    "train.checkpoint_every",  # a resumed run equals an uninterrupted one
    "mlflow.tracking_uri",
    "mlflow.experiment",
    "mlflow.log_model",
    "mlflow.num_prediction_images",
    "tune.name",
    "tune.cpus_per_trial",  # where a trial runs, as train.cpus_per_worker
    "tune.gpus_per_trial",
    "tune.out",
    "evaluate.shards",
    "evaluate.window_batch",  # speed only: the same scores
    "evaluate.workers",  # a test shows the same scores
    "evaluate.out",
    "register.eval_metrics",
    "register.out",
}
STAGE_SECTIONS = {
    "shard": ("synthetic", "shard"),
    "train": ("model", "data", "train"),
    "tune": ("tune", "model", "data", "train"),
    "evaluate": ("evaluate",),
    "register": ("register",),
}
TUNE_REPLACES = {"train.lr", "data.crop_size", "train.epochs"}  # the search sets these itself


def closure(module: str) -> set[Path]:
    """The files a module runs: its imports, theirs, and the packages they live in."""
    return codebase.closure([module])


def project_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


@cache
def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def expand(dep: str) -> set[Path]:
    path = ROOT / dep
    return set(path.rglob("*.py")) if path.is_dir() else {path} if path.suffix == ".py" else set()


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_are_the_stage_import_closure(stage: str) -> None:
    listed = set().union(*(expand(d) for d in dvc_stages()[stage]["deps"] if "${" not in d))
    needed = closure(STAGES[stage])
    missing = sorted(str(p.relative_to(ROOT)) for p in needed - listed)
    extra = sorted(str(p.relative_to(ROOT)) for p in listed - needed)
    assert not missing, f"dvc.yaml stage {stage} misses code it imports: {missing}"
    assert not extra, f"dvc.yaml stage {stage} lists code it does not import: {extra}"


def all_keys(section: str) -> set[str]:
    return {f"{section}.{f.name}" for f in dataclasses.fields(getattr(Params(), section))}


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_params_are_the_keys_that_change_outputs(stage: str) -> None:
    listed: set[str] = set()
    for key in dvc_stages()[stage]["params"]:
        listed |= all_keys(key) if "." not in key else {key}
    expected = set().union(*(all_keys(s) for s in STAGE_SECTIONS[stage])) - NOT_OUTPUT_KEYS
    if stage == "tune":
        expected -= TUNE_REPLACES
    assert listed == expected, (
        f"missing {sorted(expected - listed)}, extra {sorted(listed - expected)}"
    )


def layer(name: str) -> int:
    ranks = [
        i
        for i, members in enumerate(LAYERS)
        for m in members
        if name == m or name.startswith(m + ".")
    ]
    ranks = [i for i, members in enumerate(LAYERS) for m in members if name == m] or ranks
    return max(ranks)


def test_imports_point_back_along_the_stages() -> None:
    wrong = []
    for path in project_files():
        name = module_name(path)
        for target in imports(path, type_checking=True):  # a type is a dependency too
            if layer(target) > layer(name):
                wrong.append(f"{name} -> {target}")
    assert not wrong, f"imports that point forward: {wrong}"


def test_no_import_cycle() -> None:
    graph = {
        module_name(p): {t for t in imports(p) if t != module_name(p)} for p in project_files()
    }
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1 and not node.startswith(nxt + "."):  # a package's own __init__
                raise AssertionError(f"import cycle: {' -> '.join([*stack, node, nxt])}")
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_small_pieces() -> None:
    long_modules = [
        f"{p.relative_to(ROOT)} ({n})"
        for p in project_files()
        if (n := len(p.read_text().splitlines())) > 400
    ]
    assert not long_modules, f"modules over 400 lines: {long_modules}"
    cli = len((ROOT / "pipeline" / "cli.py").read_text().splitlines())
    assert cli <= 300, f"pipeline/cli.py has {cli} lines: parse and call, the work in its stage"
    long_functions = []
    for path in project_files():
        if path.name == "cli.py":  # the entry points
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 60:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.name} ({length})")
    assert not long_functions, f"functions over 60 lines: {long_functions}"


def test_fmt_skip_only_on_constant_tables() -> None:
    """Calls take keyword arguments instead of hand-packed ``# fmt: skip`` blocks; only constant
    tables (a class-name tuple of 150 strings) keep their packed layout."""
    wrong = []
    for path in project_files():
        text = path.read_text()
        tables = {
            node.end_lineno
            for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.Assign)
            and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets)
            and isinstance(node.value, ast.Tuple)
            and all(isinstance(e, ast.Constant) for e in node.value.elts)
        }
        for number, line in enumerate(text.splitlines(), 1):
            if "# fmt: skip" in line and number not in tables:
                wrong.append(f"{path.relative_to(ROOT)}:{number}")
    assert not wrong, f"keyword arguments, not fmt: skip, at {wrong}"


def test_cited_files_exist() -> None:
    """Docstrings and comments that name a file of this repository name one that exists."""
    import re

    cited = re.compile(
        r"\b((?:danet|pipeline|tests|bench|configs)/[\w/]+\.(?:py|yaml)|[A-Z][A-Z_]+\.md)\b"
    )
    missing = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in project_files()
        for name in cited.findall(path.read_text())
        if not (ROOT / name).exists()
    ]
    assert not missing, f"citations of files that do not exist: {missing}"


def test_a_runs_identity_is_the_code_that_decides_its_weights(tmp_path: Path) -> None:
    """Each module of a copy edited in turn (a comment appended): the code digest of a run
    changes exactly for the files that decide weights -- never for reporting, plotting, serving,
    the raw-data readers, the search or the CLI -- so such an edit reuses every finished run."""
    import shutil

    from pipeline.training.job import code_digest, identity_files

    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__py*"))
    base, changed = code_digest(tmp_path), set()
    for path in sorted(p for package in PACKAGES for p in (tmp_path / package).rglob("*.py")):
        text = path.read_text()
        path.write_text(text + "\n# a comment\n")
        if code_digest(tmp_path) != base:
            changed.add(str(path.relative_to(tmp_path)))
        path.write_text(text)
    assert code_digest(tmp_path) == base == code_digest()
    assert changed == {str(p.relative_to(ROOT)) for p in identity_files()}
    decides = {
        "danet/model.py",
        "danet/attention.py",
        "danet/losses.py",
        "pipeline/data/loader.py",
        "pipeline/data/augment.py",
        "pipeline/training/loop.py",
        "pipeline/training/worker.py",
        "pipeline/training/checkpoint.py",
        "pipeline/training/job.py",
        "pipeline/artifacts/modelfile.py",
    }
    assert decides <= changed, sorted(decides - changed)
    reports = {
        "pipeline/pictures.py",
        "pipeline/config.py",
        "pipeline/logs.py",
        "pipeline/cli.py",
        "pipeline/artifacts/pyfunc.py",
        "pipeline/mlflowstore.py",
        "pipeline/training/tracker.py",
        "pipeline/training/results.py",
        "pipeline/training/search.py",
        "pipeline/training/driver.py",
        "pipeline/data/shard.py",
        "pipeline/data/readers/camvid.py",
        "pipeline/evaluation/evaluate.py",
        "pipeline/registry/register.py",
    }
    assert not reports & changed, sorted(reports & changed)


# a concept's literals, and the one module that may spell them (issue 34: one owner per concept)
OWNED = {
    "models:/": "pipeline/modelrefs.py",
    "runs:/": "pipeline/modelrefs.py",
    "model.pt": "pipeline/modelrefs.py",
}


def test_each_concept_is_spelled_by_its_owner_only() -> None:
    """A model reference is parsed (and a ``models:/``/``runs:/`` URI built) in
    pipeline/modelrefs.py only: every other module asks it."""
    wrong = []
    for path in project_files():
        where = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                owner = OWNED.get(node.value)
                if owner is not None and owner != where:
                    wrong.append(f"{where}:{node.lineno} {node.value!r} (owner: {owner})")
    assert not wrong, f"spelled outside its owner: {wrong}"
