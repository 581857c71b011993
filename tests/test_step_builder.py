"""The benches time the step training runs: the training session, bench/train_step.py and
bench/time_to_accuracy.py build it with the one builder (pipeline/training/builder.py), and for
the same params they build the same thing: model, weights, layout, optimizer, schedule, loss,
scaler, batch path and the options of ``train_steps``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import time_to_accuracy, train_step
from pipeline.training import builder, session
from pipeline.training.builder import Step, build_step
from pipeline.training.job import TrainJob, prepare_job
from pipeline.training.loop import to_device
from tests.conftest import DEVICES, tiny_params

CPU = torch.device("cpu")


def describe(step: Step | Any) -> dict[str, Any]:
    """What decides a step, from a ``Step`` or a ``Session`` (their fields are the same)."""
    loss = step.loss_fn
    optimizer, scheduler = step.optimizer, step.scheduler
    stem = next(p for p in step.core.parameters() if p.dim() == 4)
    return {
        "model": str(step.core),
        "compiled": type(step.model).__name__,
        "channels_last": stem.is_contiguous(memory_format=torch.channels_last),
        "optimizer": (type(optimizer).__name__, optimizer.defaults),
        "groups": [(g["lr"], len(g["params"])) for g in optimizer.param_groups],
        "scheduler": (type(scheduler).__name__, scheduler.power, scheduler.warmup_iters),
        "loss": (loss.func.__name__, loss.keywords),
        "scaler": type(step.scaler).__name__,
        "batch_fn": step.batch_fn.__name__,
    }


def weights(step: Step | Any) -> dict[str, torch.Tensor]:
    return step.core.state_dict()


@pytest.fixture
def job(tiny_shards: Path, tmp_path: Path) -> TrainJob:
    model, data, train, _ = tiny_params(
        tmp_path, tiny_shards, train={"precision": "bf16", "channels_last": True, "grad_clip": 1.0}
    )
    return prepare_job(model, data, train)


def test_the_session_is_built_by_the_step_builder(job: TrainJob) -> None:
    run = session.open_session(job, device=CPU)
    step = build_step(job, CPU)
    assert describe(run) == describe(step)
    assert describe(step)["channels_last"] and describe(step)["scaler"] == "NoneType"
    assert all(torch.equal(v, weights(step)[k]) for k, v in weights(run).items())
    assert step.options == {
        "precision": "bf16",
        "accumulate": 1,
        "channels_last": True,
        "grad_clip": 1.0,
    }


class Spy:
    """``build_step`` that records the jobs it is called with."""

    def __init__(self) -> None:
        self.jobs: list[TrainJob] = []
        self.steps: list[Step] = []

    def __call__(self, job: TrainJob, *args: Any, **kwargs: Any) -> Step:
        self.jobs.append(job)
        self.steps.append(builder.build_step(job, *args, **kwargs))
        return self.steps[-1]


def test_train_step_bench_builds_what_training_builds(
    job: TrainJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/train_step.py's row for the job's recipe goes through the builder, with a job whose
    model and recipe are the session job's: the same step but for the schedule's length."""
    spy = Spy()
    monkeypatch.setattr(train_step, "build_step", spy)
    t = job.train
    bench = train_step.bench_job(
        job.model.backbone,
        job.model.head,
        job.data.crop_size,
        t.batch_size,
        t.precision,
        job.model.attention_impl,
        t.channels_last,
        num_classes=job.num_classes,
    )
    assert train_step.step_rate(bench, "cpu", steps=1) > 0
    assert [j.model for j in spy.jobs] == [job.model]
    made, trained = build_step(spy.jobs[0], CPU), build_step(job, CPU)
    assert describe(made) == describe(trained)
    assert all(torch.equal(v, weights(trained)[k]) for k, v in weights(made).items())
    assert made.options == trained.options | {"grad_clip": 0.0}  # the bench's recipe: no clip


def test_time_to_accuracy_trains_the_sessions_step(
    job: TrainJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/time_to_accuracy.py times the step alone and trains through the builder, with the
    job itself; its loop runs the session's schedule (not a second one on the same optimizer,
    which would apply the warm-up's first factor twice)."""
    spy = Spy()
    monkeypatch.setattr(time_to_accuracy, "build_step", spy)
    monkeypatch.setattr(session, "build_step", spy)
    warm = dataclasses.replace(job, train=dataclasses.replace(job.train, warmup_iters=2))
    args = argparse.Namespace(
        iters=3, step_steps=1, prefetch=2, budget=1.0, calibrate=3, splits="", out=""
    )
    line = time_to_accuracy.train(warm, args, CPU)
    assert spy.jobs == [warm, warm]  # the step alone, then the session
    assert line["iterations"] == 3 and line["prefetch"] == 2 and line["loop_vs_step"] > 0
    assert 0 < line["mfu"] < 1 and 0 < line["mfu_wall"] < 1
    schedule = spy.steps[1].scheduler  # the session's: stepped, its end moved to --iters
    assert (schedule.last_epoch, schedule.total_iters) == (3, 3)
    assert schedule.optimizer.param_groups[0]["initial_lr"] == job.train.lr


@pytest.mark.slow
def test_train_step_matrix_and_profile_run_at_a_tiny_size() -> None:
    """bench/gpu.sh speed's commands on the CPU at a tiny size: every matrix row prints its
    images/s and MFU (against the CPU's measured peak), and the profile prints its table."""
    from tests.conftest import run_bench

    common = ["--no-ray", "--crop", "32", "--batch", "2", "--steps", "1"]
    table = run_bench("train_step.py", *common, "--matrix", "--no-compile")
    rows = [line.split() for line in table.splitlines() if line.strip().startswith("resnet18d")]
    matrix = [r for r in rows if len(r) > 9]
    assert [(r[2], r[4]) for r in matrix] == [
        ("fp32", "no"),
        ("bf16", "no"),
        ("bf16", "yes"),
        ("bf16", "yes"),
    ]
    assert all(float(r[7]) > 0 and r[8].endswith("%") for r in matrix)
    profile = run_bench("train_step.py", *common, "--profile", "--rows", "5")
    assert "aten::" in profile and "Self CPU" in profile


@pytest.mark.parametrize("device", [d for d in DEVICES if not isinstance(d, str)])
def test_on_cuda_the_step_autotunes_and_decodes_on_the_gpu(job: TrainJob, device: str) -> None:
    """What the issue's H200 bench lacked: cuDNN's autotuner, as training turns it on; and the
    batch path decodes JPEGs on the GPU (``data.gpu_decode``)."""
    torch.backends.cudnn.benchmark = False
    step = build_step(job, torch.device(device))
    assert torch.backends.cudnn.benchmark
    assert step.batch_fn is not to_device
    assert describe(session.open_session(job, device=torch.device(device))) == describe(step)
