"""Shared fixtures: no test sees the user's MLflow or Ray settings, or leaks its own; a local Ray
(2 CPUs, dashboard on 127.0.0.1); an S3-compatible server (moto) and an MLflow tracking server,
both on 127.0.0.1; tiny synthetic shards; model files as training writes them."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from danet import DANetConfig, build_danet
from pipeline.artifacts.modelfile import ModelInfo, save_model_file
from pipeline.data.manifest import load_manifest
from pipeline.data.readers.base import bitwise_palette
from pipeline.data.readers.synthetic import SyntheticReader
from pipeline.data.shard import shard_dataset
from pipeline.sections import DataParams, MlflowParams, ModelParams, RegisterParams, TrainParams
from pipeline.training.checkpoint import TrainState, load_checkpoint

# Ray Train's controller looks at its workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a
# run of the tests' few iterations waits up to that long to be seen finished, every run. The
# tests' Ray (and every `danet` they start, which inherits it) looks every 0.5 s. Its preemption
# watcher (an actor process per run, for nodes a cloud drains) has nothing to watch here.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# Under pytest-xdist (`make test`'s fast tier, -n 2) each test process takes its share of the
# cores for torch's (and ONNX Runtime's) threads, and so does every process a test starts. With
# one thread per core in every process the threads outnumber the cores and spin-wait on each
# other: 4 of the fast files took 145 s in 2 processes, 57 s with shares (BENCHMARKS.md).
_PROCESSES = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _PROCESSES > 1:
    _SHARE = max(1, len(os.sched_getaffinity(0)) // _PROCESSES)
    os.environ["OMP_NUM_THREADS"] = str(_SHARE)
    torch.set_num_threads(_SHARE)


def takes_ctrl_c() -> None:
    """``Popen(preexec_fn=takes_ctrl_c)``: the child gets SIGINT's default action back. A shell
    starts a background job (``make test &``, a CI runner's step) with SIGINT ignored, every
    child inherits that, and a test that sends Ctrl-C would then see the command run to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "data" / "camvid"
# parametrize a test over the CPU and, marked gpu and skipped without one, a CUDA device
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


def use_experiment(uri: str, name: str) -> None:
    """Make ``name`` the active experiment of ``uri``, created as the pipeline creates one: a
    SQLite store's artifacts beside its database (MLflow's default is ``./mlruns`` of the
    working directory, which for a test is the checkout)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.mlflowstore import artifact_root

    client = MlflowClient(uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=artifact_root(uri))
    mlflow.set_experiment(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The S3 server's address and credentials, set before any Ray starts so that its workers (which
# inherit this environment) reach the bucket too. Read by boto3, s3fs and pyarrow alike.
S3_PORT = free_port()
os.environ.update(
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    yield
    import mlflow

    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # a test that set it leaves no trace


@pytest.fixture(scope="session", autouse=True)
def _checkout_untouched() -> Iterator[None]:
    """No test leaves MLflow's or Ray's files in the checkout (a SQLite store's artifacts go to
    ``./mlruns`` of the working directory unless the experiment says otherwise)."""
    names = ("mlruns", "mlflow.db", "ray_results")
    before = {name for name in names if (ROOT / name).exists()}
    yield
    made = sorted(name for name in names if (ROOT / name).exists() and name not in before)
    assert not made, f"the tests wrote {made} into the checkout {ROOT}"


@pytest.fixture(scope="session")
def _ray_session() -> Iterator[None]:
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(_ray_session: None) -> None:
    """A local Ray for the tests that need one (2 CPUs, dashboard on 127.0.0.1); started once and
    again after a module that ran its own cluster (tests/test_cluster.py)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False
        )


@pytest.fixture(scope="session")
def s3_bucket() -> Iterator[str]:
    """An S3-compatible server (moto's) on 127.0.0.1 with a bucket; yields ``s3://bucket``."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    boto3.client("s3").create_bucket(Bucket="danet")
    yield "s3://danet"
    server.stop()


def wait_for(url: str, process: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    import requests

    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer in {seconds} s"
        time.sleep(0.5)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 (SQLite backend, local artifacts); yields its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    command += ["--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with open(root / "server.log", "w") as log:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(f"http://127.0.0.1:{port}/health", process, root / "server.log")
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=30)


def mean_of(iou_per_class: Any) -> float:
    """The mean of per-class IoUs (a mapping or a list; None or NaN = a class never present):
    what an mIoU must equal, checked instead of a bare 0 <= mIoU <= 1."""
    values = iou_per_class.values() if isinstance(iou_per_class, dict) else iou_per_class
    present = [float(v) for v in values if v is not None and v == v]
    return sum(present) / len(present)


TinyParams = tuple[ModelParams, DataParams, TrainParams, MlflowParams]


def tiny_params(
    tmp: Path,
    shards: str | Path,
    train: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    mlflow: dict[str, Any] | None = None,
) -> TinyParams:
    """The one params factory of the tests: DANet-R18d on 32-pixel crops, 2 epochs of 2
    iterations with an evaluation each, one single-CPU worker, no retries, the run's storage,
    outputs and SQLite store in ``tmp``; each test overrides what it is about."""
    base: dict[str, Any] = {
        "batch_size": 2,
        "epochs": 2,
        "iters_per_epoch": 2,
        "eval_every_epochs": 1,
        "log_every": 2,
        "num_workers": 1,
        "cpus_per_worker": 1,
        "max_failures": 0,
        "storage_path": str(tmp / "ray"),
        "out": str(tmp / "out"),
    }
    tracking = {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "num_prediction_images": 1}
    return (
        ModelParams(backbone="resnet18d"),
        DataParams(**{"shards": str(shards), "crop_size": 32, "shuffle_buffer": 4, **(data or {})}),
        TrainParams(**{**base, **(train or {})}),
        MlflowParams(**{**tracking, **(mlflow or {})}),
    )


def synthetic_shards(out: Path, train: int, val: int, max_count: int, **reader: int) -> Path:
    """Synthetic scenes (64x48 unless told) sharded into ``out``."""
    width, height = reader.get("width", 64), reader.get("height", 48)
    shard_dataset(
        SyntheticReader(num_samples={"train": train, "val": val}, width=width, height=height),
        ("train", "val"),
        out,
        max_count=max_count,
    )
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic shards, 64x48: 6 train and 4 val images."""
    return synthetic_shards(tmp_path_factory.mktemp("tiny") / "shards", 6, 4, max_count=3)


def write_model_file(path: Path, shards: Path, seed: int = 0, **meta: object) -> Path:
    """A randomly initialised DANet-R18d for the shards' classes, saved as training saves it."""
    manifest = load_manifest(shards)
    torch.manual_seed(seed)
    config = DANetConfig(num_classes=manifest.num_classes, backbone="resnet18d")
    model = build_danet(config)
    info = ModelInfo(
        config=config,
        classes=manifest.classes,
        palette=manifest.palette,
        mean=manifest.mean,
        std=manifest.std,
        dataset=manifest.dataset,
        meta=dict(meta),
    )
    save_model_file(path, model.state_dict(), info)
    return path


def evaluation_record(model_uri: str, miou: float, **changes: Any) -> Any:
    """An ``Evaluation`` of ``model_uri`` as danet evaluate writes it, on split val of shards
    with digest ``abc`` (``changes`` replace any field)."""
    from pipeline.evaluation.report import Evaluation

    fields: dict[str, Any] = {
        "model": model_uri,
        "model_uri": model_uri,
        "dataset": "synthetic",
        "split": "val",
        "split_sha256": "abc",
        "protocol": "official-whole-flip",
        "miou": miou,
        "pixel_acc": 0.9,
        "mean_acc": 0.5,
        "iou_per_class": {"a": miou, "b": miou},
        "images": 4,
    }
    return Evaluation(**{**fields, **changes})


def billion_laughs() -> str:
    """Nine anchors, each a list of nine aliases to the one before: 9**9 values in ~600 bytes."""
    lists = ["&a [" + ", ".join(["lol"] * 9) + "]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lists.append(f"&{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "train:\n  lr: [" + ",\n    ".join(lists) + "]\n"


BILLION_LAUGHS = billion_laughs()


def run_bench(script: str, *args: str) -> str:
    command = [sys.executable, str(ROOT / "bench" / script), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def synthetic(n_train: int = 7, n_val: int = 3) -> SyntheticReader:
    return SyntheticReader(num_samples={"train": n_train, "val": n_val}, width=64, height=48)


def latest_state(storage: Path, run_name: str) -> TrainState:
    checkpoints = sorted(p for p in (storage / run_name).glob("checkpoint_*") if p.is_dir())
    return load_checkpoint(checkpoints[-1])[0]


def stop_after_checkpoints(command: list[str], tmp: Path, sig: signal.Signals, more: int) -> int:
    """Run ``command`` until ``more`` checkpoints past the current newest exist, send ``sig``;
    the iteration of the newest checkpoint when it stopped."""
    run_dir = tmp / "ray" / "signals"

    def newest() -> int:
        done = [
            json.loads(p.read_text())["iteration"]
            for p in run_dir.glob("checkpoint_*/progress.json")
        ]
        return max(done, default=0)

    start, env = newest(), {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp / f"{sig.name}.log"
    with open(log, "w") as output:  # a file: a full pipe would block the driver
        process = subprocess.Popen(
            command, cwd=tmp, env=env, stdout=output, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 300
        while newest() < start + more:
            alive = process.poll() is None and time.monotonic() < deadline
            assert alive, log.read_text()[-3000:]
            time.sleep(0.2)
        process.send_signal(sig)
        process.wait(timeout=120)
    if sig != signal.SIGKILL:  # stopped, not killed: one line and the interrupt's exit code
        assert process.returncode in (1, 130, 128 + sig), log.read_text()[-3000:]
    if start:
        resumed = re.search(r"resumed at iteration (\d+)", log.read_text())
        assert resumed and int(resumed.group(1)) >= start - 1, log.read_text()[-3000:]
    return newest()


BARE = ("onnxruntime", "numpy", "numpy.libs", "PIL", "pillow.libs")  # and nothing else


def readme_python() -> str:
    """The README's one ```python block: running an exported file without torch or the project."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = re.findall(r"<!-- readme-check: bare python -->\n```python\n(.*?)```", readme, re.S)
    return block


def run_bare_python(code: str, cwd: Path, tmp: Path) -> str:
    """``code`` in a Python that sees the standard library, onnxruntime, numpy and pillow only:
    no site-packages (``-I -S``), one folder on the path holding links to those three."""
    import site
    import subprocess
    import sys

    packages = Path(site.getsitepackages()[0])
    bare = tmp / "bare-site"
    bare.mkdir(exist_ok=True)
    for name in BARE:
        if (packages / name).exists() and not (bare / name).exists():
            (bare / name).symlink_to(packages / name)
    prelude = (
        f"import sys; sys.path.insert(0, {str(bare)!r})\n"
        "for name in ('torch', 'danet', 'pipeline', 'mlflow', 'onnx'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    raise SystemExit(f'{name} is importable: not a bare Python')\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", prelude + code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def write_image(path: Path, w: int = 8, h: int = 6, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format=fmt)


def write_label(path: Path, values: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(values.astype(np.uint8), mode="L")
    if palette:
        im = im.convert("P")
        im.putpalette([v for c in bitwise_palette(256) for v in c])
    im.save(path)


def label_grid(values: list[int], h: int = 6, w: int = 8) -> np.ndarray:
    return np.resize(np.array(values, dtype=np.uint8), (h, w))


def log_model(uri: str, dataset: str = "synthetic") -> str:
    """A tiny logged model (with a run) as training logs it; returns its model URI."""
    import mlflow
    import torch

    from pipeline.mlflowstore import tracking_uri

    metadata = {"classes": ["a", "b"], "palette": [[0, 0, 0], [255, 255, 255]], "dataset": dataset}
    with tracking_uri(uri):
        use_experiment(uri, dataset)
        with mlflow.start_run() as run:
            mlflow.pytorch.log_model(
                torch.nn.Conv2d(3, 2, 1),
                name="model",
                serialization_format="pickle",
                metadata=metadata,
                pip_requirements=["torch"],  # not inferred: that imports the model in a subprocess
            )
        found = mlflow.search_logged_models(
            filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list"
        )
    return str(found[0].model_uri)


def evaluation(tmp: Path, uri: str, miou: float, **changes: str) -> RegisterParams:
    """An evaluation of a freshly logged model, as danet evaluate writes it."""
    model_uri = log_model(uri)
    record = evaluation_record(model_uri, miou, **changes)
    path = tmp / f"eval-{model_uri.rsplit('/', 1)[-1]}.json"
    path.write_text(record.to_json())
    return RegisterParams(eval_metrics=str(path), out=str(tmp / "registered.json"))
