"""The benchmarks run: bench/time_to_accuracy.py on the synthetic shards with a tiny budget, and
on CamVid when ../shared/data/camvid is there (one JSON line each)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CAMVID, ROOT, mean_of, run_bench


def time_to_accuracy(shards: Path, *args: str) -> dict:
    command = [sys.executable, str(ROOT / "bench" / "time_to_accuracy.py"), "--shards", str(shards)]
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_time_to_accuracy_on_synthetic_shards(tiny_shards: Path) -> None:
    """A 20-second budget: calibration, a fitted schedule, evaluation of two splits."""
    common = ["--set", "data.crop_size=32", "--set", "train.batch_size=2", "--calibrate", "6"]
    line = time_to_accuracy(
        tiny_shards, "--budget", "20", "--splits", "train,val", "--step-steps", "2", *common
    )
    assert (
        line["iterations"] >= 6 and line["images_per_s_wall"] > 0 and line["images_per_s_step"] > 0
    )
    assert line["step_tflop"] > 0 and 0 < line["mfu"] < 1  # against the CPU's measured peak
    assert line["prefetch"] == 0 and line["loop_vs_step"] > 0  # a CPU's batches: in turn
    # the schedule fills the budget (3% on a GPU; 20 s of ~0.3 s steps on a CPU: 5%)
    assert 0.95 <= line["budget_used"] <= 1.05, line["train_seconds"]
    assert line["diverged"] is None and line["windows"] > 0 and not line["recoveries"]
    for split in ("train", "val"):
        scores = line[split]
        assert scores["miou"] == pytest.approx(mean_of(scores["iou_per_class"]))
        assert set(scores["iou_per_class"]) >= {"Road", "Sky"}
    assert line["protocol"] == "official-whole-flip"


@pytest.mark.slow
def test_time_to_accuracy_names_the_first_bad_window(tiny_shards: Path) -> None:
    """An lr that blows the weights up, no recovery allowed: the bench stops at the first bad
    log window (checked at the training's cadence, not at the end) and says which."""
    line = time_to_accuracy(
        tiny_shards, "--iters", "30", "--step-steps", "1", "--splits", "val",
        "--set", "data.crop_size=32", "--set", "train.batch_size=2", "--set", "train.lr=1000000.0",
        "--set", "train.log_every=3", "--set", "train.max_recoveries=0",
    )  # fmt: skip
    assert line["diverged"] is not None, line
    assert line["diverged"]["iteration"] % 3 == 0 and line["diverged"]["iteration"] < 30
    assert line["iterations"] == line["diverged"]["iteration"]


@pytest.mark.slow
@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid not present")
def test_time_to_accuracy_on_camvid(tmp_path: Path) -> None:
    from pipeline.data.readers import make_reader
    from pipeline.data.shard import shard_dataset

    shard_dataset(make_reader("camvid", CAMVID), ("val",), tmp_path / "camvid", workers=2)
    args = ["--iters", "3", "--step-steps", "1", "--splits", "val", "--set", "data.train_split=val"]
    args += [
        "--set",
        "data.crop_size=64",
        "--set",
        "train.batch_size=2",
        "--set",
        "evaluate.base_size=120",
    ]
    line = time_to_accuracy(tmp_path / "camvid", *args)
    assert line["iterations"] == 3
    assert line["val"]["miou"] == pytest.approx(mean_of(line["val"]["iou_per_class"]))
    assert line["protocol"] == "official-base120-whole-flip"


@pytest.mark.slow
def test_speed_benchmarks_run_at_tiny_sizes() -> None:
    """The GPU commands of BENCHMARKS.md, on the CPU at tiny sizes: each prints its figures."""
    table = run_bench(
        "attention.py", "--sizes", "8x8", "--dtypes", "fp32", "bf16", "--repeats", "1"
    )
    rows = [line.split() for line in table.splitlines() if line.strip().startswith("8x8")]
    assert [(r[1], r[2]) for r in rows] == [
        ("fp32", "fwd"),
        ("fp32", "fwd+bwd"),
        ("bf16", "fwd"),
        ("bf16", "fwd+bwd"),
    ]
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows)  # dense s, efficient s
    lines = run_bench("inference.py", "--size", "32x64", "--repeats", "1").splitlines()
    measured = [json.loads(line) for line in lines]
    assert [m["attention"] for m in measured] == ["efficient", "dense"]
    assert all(m["images_per_s"] > 0 and m["size"] == "32x64" for m in measured)
    step = run_bench("train_step.py", "--no-ray", "--crop", "32", "--batch", "2", "--steps", "1")
    assert "FCN / DANet speed" in step


@pytest.mark.slow
def test_export_benchmark_runs_at_a_tiny_size() -> None:
    """bench/export.py's rows at 64x96: every one prints its speed and memory, and the ratios."""
    lines = run_bench(
        "export.py", "--sizes", "64x96", "--repeats", "1", "--calibration", "1",
        "--rows", "torch-fp32,ort-fp32,ort-int8",
    ).splitlines()  # fmt: skip
    measured = [json.loads(line) for line in lines if line.startswith("{")]
    rows = {m["row"]: m for m in measured if "row" in m}
    assert set(rows) == {"torch-fp32", "ort-fp32", "ort-int8"}
    assert all(r["images_per_s"] > 0 and r["peak_mib"] > 0 for r in rows.values())
    assert rows["torch-fp32"]["gflops"] > 0
    assert set(measured[-1]["x_vs_torch_fp32"]) == set(rows)
