"""The bundle for a bare GPU machine (bench/gpu_bundle.py), proven on this CPU: a venv holding
only the GPU machine's packages (bench/gpu_machine.txt) cannot import what the pipeline needs
beyond them; with the bundle on PYTHONPATH, as .device/gpu-bundle.sh puts it there, ``danet
shard``, ``train``, ``evaluate`` and ``register`` run through it, Ray's workers and MLflow's
SQLite store and registry included. A module the bundle forgot fails here, not in a paid GPU
minute.

The bundle here is built for this interpreter from the project's .venv, file by file as the GPU
machine's archive is built from the same versions' wheels for its Python; the machine's packages
are .venv's versions of them (the list knows few of the machine's own).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml

from bench.gpu_bundle import LEAVE_OUT, build, canon, carried, machine_env, pruned, read_machine
from tests.conftest import ROOT, mean_of, tiny_params

MACHINE = read_machine()
# what the machine lacks and the pipeline imports: the bundle brings these
BROUGHT = ("ray", "mlflow", "webdataset", "optuna", "sqlalchemy", "alembic", "cryptography")


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GPU machine's packages, and nothing else, as a venv: its python."""
    return Path(str(machine_env(tmp_path_factory.mktemp("machine") / "venv")["python"]))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "site"
    build(out, "local", link=True)
    return out


def command_env(bundle: Path | None) -> dict[str, str]:
    """The environment .device/gpu-bundle.sh gives a command: the bundle, then the checkout; none
    of this process's Python, Ray or MLflow settings."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RAY_", "MLFLOW_"))}
    path = [str(bundle)] if bundle else []
    return {**keep, "PYTHONPATH": os.pathsep.join([*path, str(ROOT)]), "PYTHONNOUSERSITE": "1"}


def importable(python: Path, modules: Iterable[str], bundle: Path | None) -> dict[str, str]:
    """Each module -> the file it imports from there, or "" when it cannot be found."""
    code = (
        "import importlib.util, json, sys\n"
        "specs = {m: importlib.util.find_spec(m) for m in sys.argv[1:]}\n"
        "print(json.dumps({m: (s.origin or '') if s else '' for m, s in specs.items()}))"
    )
    done = subprocess.run(
        [str(python), "-c", code, *modules],
        env=command_env(bundle),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(json.loads(done.stdout))


def danet(python: Path, bundle: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline ARGS`` (the danet command) in the machine's venv with ``bundle``."""
    return subprocess.run(
        [str(python), "-m", "pipeline", *args],
        cwd=cwd,
        env=command_env(bundle),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_bundle_carries_what_the_machine_lacks_and_only_that() -> None:
    """Ray, MLflow's client and SQL store, webdataset, optuna and what they require on the
    machine's Python; nothing the machine has (at a version the requirements accept), nothing
    left out on purpose. This interpreter's closure holds that set (and the backports an older
    Python needs), so the runs below prove it."""
    assert MACHINE.python.startswith("3.12.") and {"torch", "numpy", "pyarrow"} <= set(
        MACHINE.packages
    )
    names = {canon(d.metadata["Name"]) for d in carried(MACHINE, MACHINE.python)}
    assert {"ray", "mlflow-skinny", "sqlalchemy", "alembic", "webdataset", "optuna"} <= names
    assert not names & set(MACHINE.packages) and not names & set(LEAVE_OUT)
    here = ".".join(map(str, sys.version_info[:3]))
    assert names <= {canon(d.metadata["Name"]) for d in carried(MACHINE, here)}


def test_the_bundle_leaves_out_what_no_command_runs(bundle: Path) -> None:
    paths = [p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()]
    assert not [p for p in paths if pruned(p)]
    assert not [p for p in paths if p.startswith(("ray/jars/", "ray/rllib/", "ray/serve/"))]
    assert not [p for p in paths if "/tests/" in p or "__pycache__" in p]
    for binary in ("ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet"):
        assert os.access(bundle / binary, os.X_OK), binary
    assert (bundle / "ray/dashboard/client/build/index.html").is_file()  # the dashboard needs it


def test_the_machine_alone_lacks_what_the_bundle_brings(machine: Path, bundle: Path) -> None:
    alone = importable(machine, [*BROUGHT, "torch", "numpy", "timm"], None)
    assert [m for m in BROUGHT if alone[m]] == [], alone
    assert all(alone[m] for m in ("torch", "numpy", "timm")), alone
    assert str(ROOT / ".venv") not in str(Path(alone["torch"]).parent)  # a link in the venv
    found = importable(machine, BROUGHT, bundle)
    assert all(found[m].startswith(str(bundle)) for m in BROUGHT), found


def test_a_module_the_bundle_forgot_fails(machine: Path, tmp_path: Path) -> None:
    """The bundle without webdataset: ``danet shard`` stops on the import it needs."""
    bundle = tmp_path / "site"
    build(bundle, "local", link=True, leave_out=[*LEAVE_OUT, "webdataset"])
    assert not (bundle / "webdataset").exists()
    done = danet(machine, bundle, tmp_path, "shard", "--params", str(params_file(tmp_path)))
    assert done.returncode != 0 and "No module named 'webdataset'" in done.stderr, done.stderr


def params_file(tmp: Path) -> Path:
    """Synthetic scenes sharded at 64x48 (6 train, 4 val), the tests' tiny training
    (tests.conftest.tiny_params: 2 epochs of 2 iterations, one single-CPU worker), an
    evaluation of its model.pt, its registration: all under ``tmp``."""
    shards = tmp / "shards"
    model, data, train, tracking = tiny_params(tmp, shards)
    params = {
        "synthetic": {"num_samples": {"train": 6, "val": 4}, "width": 64, "height": 48},
        "shard": {"out": str(shards), "max_count": 3, "workers": 1},
        "model": dataclasses.asdict(model),
        "data": dataclasses.asdict(data),
        "train": dataclasses.asdict(train),
        "mlflow": dataclasses.asdict(tracking),
        "evaluate": {"model": str(tmp / "out/model.pt"), "shards": str(shards)},
    }
    params["evaluate"]["out"] = str(tmp / "eval")
    params["register"] = {
        "eval_metrics": str(tmp / "eval" / "metrics.json"),
        "out": str(tmp / "register" / "registered.json"),
    }
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp / "params.yaml"


@pytest.mark.slow
def test_shard_train_evaluate_register_through_the_bundle(
    machine: Path, bundle: Path, tmp_path: Path
) -> None:
    """The commands as the GPU machine runs them, on the CPU: Ray Train (its GCS, raylet,
    dashboard and worker processes), MLflow's SQLite store and registry from the bundle."""
    params = str(params_file(tmp_path))
    for stage in ("shard", "train", "evaluate", "register"):
        done = danet(machine, bundle, tmp_path, stage, "--params", params)
        assert done.returncode == 0, f"danet {stage}:\n{done.stdout[-2000:]}{done.stderr[-4000:]}"
        if stage == "train":
            assert "[train] iter 4/4" in done.stdout + done.stderr  # a Ray Train worker's line
    trained = json.loads((tmp_path / "out" / "metrics.json").read_text())
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["miou"] == pytest.approx(mean_of(evaluated["iou_per_class"]))
    assert evaluated["images"] == 4 and trained["run_name"].startswith("danet-")

    from mlflow.tracking import MlflowClient  # this environment's: the same version

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(trained["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "val/miou" in run.data.metrics
    registered = json.loads((tmp_path / "register" / "registered.json").read_text())
    assert (registered["version"], registered["alias"]) == ("1", "champion")
