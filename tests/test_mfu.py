"""A run reports its own MFU (pipeline/training/flops.py): one micro-batch's FLOPs counted
without touching the run, the device's peak (a table for GPUs, a measured and cached matmul
rate for a CPU), and the tracker's progress line and MLflow metric."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from danet import DANetConfig, build_danet
from pipeline.training import flops
from pipeline.training.flops import Utilization, cpu_peak, gpu_peak, step_flops
from pipeline.training.records import History, StepRecord

CPU = torch.device("cpu")


class Conv(nn.Module):
    """One 3x3 convolution, returning named logits as the segmentation models do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


def test_a_convolutions_flops_forward_and_backward() -> None:
    """2 x outputs x inputs x 3 x 3 multiply-adds forward, the same for the weight gradient
    (the input needs none)."""
    forward = 2 * (4 * 8 * 8) * 3 * 9
    assert step_flops(Conv(), 1, 8, CPU) == 2 * forward
    assert step_flops(Conv(), 3, 8, CPU) == 3 * 2 * forward


def test_counting_leaves_the_run_untouched() -> None:
    """The count runs a copy in eval mode with the RNGs forked: the weights, BatchNorm's running
    statistics, the gradients and the RNG are as they were; train mode is kept."""
    torch.manual_seed(0)
    model = build_danet(DANetConfig(num_classes=5, backbone="resnet18d")).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert step_flops(model, 2, 32, CPU, "bf16", channels_last=True) > 0
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and model.training


def test_efficient_attention_counts_as_the_dense_one_on_a_cpu() -> None:
    """torch's counter has no formula for the CPU attention kernel: ours counts it as the CUDA
    kernels are, so the efficient position attention's step counts what the dense one's does."""
    counts = {}
    for impl in ("dense", "efficient"):
        torch.manual_seed(0)
        model = build_danet(DANetConfig(num_classes=5, backbone="resnet18d", attention_impl=impl))
        counts[impl] = step_flops(model, 2, 64, CPU)
    assert counts["efficient"] == pytest.approx(counts["dense"], rel=0.01)


def test_gpu_peaks_by_name_and_precision() -> None:
    assert gpu_peak("NVIDIA H200", "bf16") == 989e12
    assert gpu_peak("NVIDIA H100 PCIe", "bf16") == 756e12  # before the SXM "H100"
    assert gpu_peak("NVIDIA H100 80GB HBM3", "fp32") == 495e12  # TF32
    assert gpu_peak("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 units
    assert gpu_peak("Some Future GPU", "bf16") is None


def test_the_cpu_peak_is_measured_once_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured: list[torch.dtype] = []

    def measure(dtype: torch.dtype) -> float:
        measured.append(dtype)
        return 1e11

    monkeypatch.setattr(flops, "measure_matmul", measure)
    cache = tmp_path / "danet" / "peak.json"
    assert cpu_peak(torch.float32, cache) == cpu_peak(torch.float32, cache) == 1e11
    assert cpu_peak(torch.bfloat16, cache) == 1e11
    assert measured == [torch.float32, torch.bfloat16] and cache.is_file()


def test_the_matmul_measure_is_a_plausible_rate() -> None:
    threads = torch.get_num_threads()
    rate = flops.measure_matmul(torch.float32, sizes=(128,), seconds=0.05)
    assert 1e8 < rate < 1e14 and torch.get_num_threads() == threads


def test_mfu_over_devices() -> None:
    u = Utilization(flops_per_image=2e9, peak=1e12, devices=2)
    assert u.mfu(100.0) == pytest.approx(0.1)
    assert Utilization(2e9, None).mfu(100.0) is None


def test_the_tracker_logs_mfu(
    tiny_shards: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Counted once per tracker; each step record then carries MFU to the progress line and
    MLflow's metrics (``mfu``)."""
    from pipeline.training.job import prepare_job
    from pipeline.training.tracker import Tracker
    from tests.conftest import tiny_params

    monkeypatch.setattr(flops, "CACHE", tmp_path / "peak.json")
    model, data, train, _ = tiny_params(tmp_path, tiny_shards)
    job = prepare_job(model, data, train)
    tracker = Tracker(job, History())
    core = build_danet(model.to_danet_config(job.num_classes))
    with caplog.at_level(logging.INFO):
        tracker.count_flops(core, CPU, world=1)
        first: Any = tracker.utilization
        tracker.count_flops(core, CPU, world=1)
        assert tracker.utilization is first and first.flops_per_image > 0 and first.peak
        record = StepRecord(iteration=2, loss=1.0, lr=0.01, images_per_s=10.0)
        tracker.step(record)
    assert record.mfu == pytest.approx(10.0 * first.flops_per_image / first.peak)
    assert record.mlflow_metrics()["mfu"] == record.mfu
    assert f"MFU {record.mfu:.1%}" in caplog.text
    assert "GFLOP per image and step" in caplog.text
