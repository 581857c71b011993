"""Two commands at once: the locks (flock, and a lease object on an object store) and what users
do with them -- two ``danet shard`` into one folder, three ``danet register`` on one registry,
two ``danet train`` of one run. Nothing is lost, nothing wedges, no champion is crowned wrongly.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.errors import ServiceError
from pipeline.locks import _lease, exclusive, lock_file
from tests.conftest import synthetic_shards

DANET = str(Path(sys.executable).parent / "danet")
BUSY = "another danet command is writing it now"


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


# --- the lock itself -------------------------------------------------------------------------


def test_one_holder_at_a_time_and_no_file_in_the_store(tmp_path: Path) -> None:
    store = tmp_path / "ray" / "run-a"
    store.mkdir(parents=True)
    with exclusive(str(store), "train.run_name run-a"):
        with pytest.raises(ServiceError) as refused, exclusive(str(store), "train.run_name run-a"):
            pytest.fail("a second holder got the lock")
        message = str(refused.value)
        assert message.startswith(f"train.run_name run-a: {BUSY} (") and "\n" not in message
        assert f'"pid": {os.getpid()}' in message and "wait for it to finish" in message
    with exclusive(str(store), "train.run_name run-a"):  # released at the end of the block
        pass
    assert list(store.iterdir()) == [] and not lock_file(str(store)).is_relative_to(tmp_path)
    assert lock_file(str(store)) == lock_file(str(tmp_path / "ray" / "." / "run-a"))  # resolved


def test_a_waiting_holder_gets_the_lock_when_it_is_released(tmp_path: Path) -> None:
    location, order = str(tmp_path / "registry"), []
    held = threading.Event()

    def first() -> None:
        with exclusive(location, "first"):
            held.set()
            time.sleep(0.5)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait(10)
    with exclusive(location, "second", wait=True):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]  # the second waited for the first's release


def test_a_killed_holder_leaves_nothing_locked(tmp_path: Path) -> None:
    """SIGKILL gives no process a chance to clean up: the kernel releases its flock."""
    location = str(tmp_path / "run")
    code = (
        "import sys, time\nfrom pipeline.locks import exclusive\n"
        "with exclusive(sys.argv[1], 'x'):\n    print('held', flush=True)\n    time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, location], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(ServiceError, match=rf'"pid": {holder.pid}'),
            exclusive(location, "train.run_name run"),
        ):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    with exclusive(location, "train.run_name run"):
        pass


def test_a_lease_object_guards_an_object_store(s3_bucket: str) -> None:
    """On s3:// a lease object ``<location>.lock`` is created only if absent (If-None-Match):
    a live holder's is refused, a dead process's on this host taken over, removed at the end."""
    import fsspec

    location = f"{s3_bucket}/ray/run-b"
    fs, root = fsspec.core.url_to_fs(location)
    key = root + ".lock"
    with _lease(location, "train.run_name run-b"):
        assert json.loads(fs.cat(key))["pid"] == os.getpid()
        with (
            pytest.raises(ServiceError, match=r"holds its lease s3://danet/ray/run-b\.lock"),
            _lease(location, "train.run_name run-b"),
        ):
            pass
    assert not fs.exists(key)

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    fs.pipe(key, json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout)}).encode())
    with _lease(location, "train.run_name run-b"):  # its holder is gone: taken over
        assert json.loads(fs.cat(key))["pid"] == os.getpid()
    fs.pipe(key, json.dumps({"host": "another-host", "pid": 1}).encode())
    with (
        pytest.raises(ServiceError, match="if that process is gone, delete the lease object"),
        exclusive(location, "train.run_name run-b"),
    ):
        pass
    assert json.loads(fs.cat(key))["host"] == "another-host"  # someone else's: left alone
    fs.rm_file(key)


# --- commands at once ------------------------------------------------------------------------


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    output = open(log, "w")  # noqa: SIM115 -- a file, not a pipe: a full pipe would block
    return subprocess.Popen(
        [DANET, *args], cwd=cwd, env=env(), stdout=output, stderr=subprocess.STDOUT
    )


def finish(processes: list[subprocess.Popen], logs: list[Path], timeout: float) -> list[str]:
    for process in processes:
        process.wait(timeout)
    return [log.read_text() for log in logs]


@pytest.mark.slow
def test_two_shards_into_one_folder_leave_one_whole_dataset(tmp_path: Path) -> None:
    params = {
        "synthetic": {"num_samples": {"train": 24, "val": 8}, "width": 64, "height": 48},
        "shard": {"dataset": "synthetic", "out": "shards", "workers": 1, "max_count": 6},
    }
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    logs = [tmp_path / f"shard{i}.log" for i in range(2)]
    outputs = finish([start(["shard"], tmp_path, log) for log in logs], logs, 300)
    for process_log in outputs:
        assert "Traceback" not in process_log and "error:" not in process_log, process_log[-2000:]
    from pipeline.data.manifest import load_manifest

    manifest = load_manifest(tmp_path / "shards")
    for split, count in (("train", 24), ("val", 8)):
        info = manifest.split(split)
        assert info.samples == count
        for shard in info.shards:
            data = (tmp_path / "shards" / shard.name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.bytes
    listed = {s.name for split in ("train", "val") for s in manifest.split(split).shards}
    assert {p.name for p in (tmp_path / "shards").iterdir()} == listed | {"manifest.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "params.yaml",
        "shard0.log",
        "shard1.log",
        "shards",
    ]


@pytest.mark.slow
def test_three_registers_at_once_crown_the_best(tmp_path: Path) -> None:
    """Three evaluations registered at the same moment: three versions, the best one champion,
    and registered.json (written last) names that champion."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import evaluation

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    evals = {miou: evaluation(tmp_path, uri, miou).eval_metrics for miou in (0.5, 0.7, 0.6)}
    params = {"mlflow": {"tracking_uri": uri}, "register": {"out": "registered.json"}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    logs = [tmp_path / f"register{i}.log" for i in range(3)]
    processes = [
        start(["register", "--eval-metrics", path], tmp_path, log)
        for path, log in zip(evals.values(), logs, strict=True)
    ]
    outputs = finish(processes, logs, 300)
    for process, process_log in zip(processes, outputs, strict=True):
        assert process.returncode == 0 and "Traceback" not in process_log, process_log[-2000:]
    client = MlflowClient(uri)
    versions = client.search_model_versions("name = 'danet-synthetic'")
    assert sorted(str(v.version) for v in versions) == ["1", "2", "3"]
    champion = client.get_model_version_by_alias("danet-synthetic", "champion")
    assert champion.tags["eval_miou"] == "0.700000"
    registered = json.loads((tmp_path / "registered.json").read_text())
    assert registered["champion_version"] == str(champion.version)
    assert registered["champion_eval_miou"] == pytest.approx(0.7)


@pytest.mark.slow
def test_two_trains_of_one_run_one_refused_the_run_whole(tmp_path: Path) -> None:
    """The same ``danet train`` twice at once: one trains, the other is refused in one line
    before it starts Ray; the run afterwards is whole and a third command reuses it."""
    shards = synthetic_shards(tmp_path / "shards", 6, 2, max_count=4)
    train = {
        "batch_size": 2,
        "epochs": 2,
        "iters_per_epoch": 2,
        "eval_every_epochs": 2,
        "log_every": 1,
        "cpus_per_worker": 1,
        "max_failures": 0,
        "storage_path": "ray",
        "out": "out",
        "run_name": "twice",
    }
    params = {
        "model": {"backbone": "resnet18d"},
        "data": {"shards": str(shards), "crop_size": 32, "shuffle_buffer": 4},
        "train": train,
        "mlflow": {"tracking_uri": "sqlite:///mlflow.db", "num_prediction_images": 1},
    }
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    logs = [tmp_path / f"train{i}.log" for i in range(2)]
    processes = [start(["train"], tmp_path, log) for log in logs]
    outputs = finish(processes, logs, 600)
    codes = sorted(p.returncode for p in processes)
    assert codes == [0, 2], "\n---\n".join(o[-2000:] for o in outputs)
    refused = outputs[[p.returncode for p in processes].index(2)]
    errors = [line for line in refused.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"train.run_name twice: {BUSY}" in errors[0], refused[-2000:]
    assert "Traceback" not in refused and "Started a local Ray" not in refused
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["run_name"] == "twice" and metrics["final"]["iteration"] == 4

    again = subprocess.run(
        [DANET, "train"], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "already finished with this code, params and data: reusing it" in (
        again.stdout + again.stderr
    )
