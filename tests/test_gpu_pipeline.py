"""The pipeline on a CUDA device, and the GPU requests its params make, checked on any machine.

The tests marked ``gpu`` skip without CUDA. The GPU machine runs them with the bundle (README
"On a GPU machine"): ``source .device/env.sh && source .device/gpu-bundle.sh && python -m pytest
-m gpu tests/test_gpu_pipeline.py``: Ray Train placing its worker on the GPU (JPEG decode there
too) with MLflow's GPU system metrics, a driver killed mid-run and resumed from the checkpoint the
CUDA run wrote, and ``danet evaluate`` on CUDA scoring as on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import ConfigError
from pipeline.data.readers.synthetic import SyntheticReader
from pipeline.data.shard import shard_dataset
from pipeline.sections import EvaluateParams, TrainParams, TuneParams
from pipeline.training.driver import run_training, worker_resources
from pipeline.training.job import prepare_job
from pipeline.training.results import RunSummary
from pipeline.training.trial import trial_train
from tests.conftest import latest_state, stop_after_checkpoints, tiny_params

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ON_GPU = {"use_gpu": True}


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic scenes, 64x48, as JPEG (the GPU decodes them): 8 train, 4 val images."""
    out = tmp_path_factory.mktemp("gpu") / "shards"
    reader = SyntheticReader(num_samples={"train": 8, "val": 4}, width=64, height=48)
    shard_dataset(reader, ("train", "val"), out, max_count=4, image_format="jpg")
    return out


def test_a_worker_asks_for_its_gpu_or_a_share_of_one() -> None:
    assert worker_resources(TrainParams(cpus_per_worker=3)) == {"CPU": 3}
    assert worker_resources(TrainParams(use_gpu=True)) == {"CPU": 2, "GPU": 1.0}
    shared = TrainParams(use_gpu=True, gpus_per_worker=0.5)
    assert worker_resources(shared) == {"CPU": 2, "GPU": 0.5}
    # a search's trials: tune.gpus_per_trial, 0 = train.gpus_per_worker
    assert (
        trial_train(TrainParams(use_gpu=True), TuneParams(gpus_per_trial=0.5)).gpus_per_worker
        == 0.5
    )
    assert trial_train(shared, TuneParams()).gpus_per_worker == 0.5


def test_gpu_shares_are_checked(jpeg_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.gpus_per_worker must be"):
        TrainParams(gpus_per_worker=0)
    with pytest.raises(ConfigError, match=r"tune\.gpus_per_trial must be"):
        TuneParams(gpus_per_trial=1.5)
    model, data, _, _ = tiny_params(tmp_path, jpeg_shards)
    two = TrainParams(use_gpu=True, num_workers=2, batch_size=2, gpus_per_worker=0.5)
    with pytest.raises(ConfigError, match="need a whole GPU each"):
        prepare_job(model, data, two)
    prepare_job(model, data, dataclasses.replace(two, num_workers=1))  # one worker may share


@pytest.fixture(scope="module")
def cuda_run(
    jpeg_shards: Path, tmp_path_factory: pytest.TempPathFactory, ray_cluster: None
) -> tuple[Path, RunSummary]:
    """``danet train`` with train.use_gpu through Ray Train: 3 epochs of 3 iterations."""
    tmp = tmp_path_factory.mktemp("cuda-run")
    train = {**ON_GPU, "epochs": 3, "iters_per_epoch": 3, "log_every": 1}
    configs = tiny_params(tmp, jpeg_shards, train=train, mlflow={"system_metrics_every": 1})
    return tmp, run_training(*configs)


@pytest.mark.gpu
@pytest.mark.slow
@CUDA
def test_ray_train_runs_its_worker_on_the_gpu(cuda_run: tuple[Path, RunSummary]) -> None:
    from mlflow.tracking import MlflowClient

    tmp, summary = cuda_run
    state = latest_state(tmp / "ray", summary.run_name)
    assert state.iteration == 9 and all(t.device.type == "cpu" for t in state.model.values())
    run = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.use_gpu"] == "True"
    gpu = [k for k in run.data.metrics if re.match(r"system/gpu_0_\w+", k)]
    assert gpu, sorted(run.data.metrics)  # nvidia-ml-py's samples of the GPU the worker used


@pytest.mark.gpu
@pytest.mark.slow
@CUDA
def test_cuda_evaluation_scores_as_the_cpu_does(
    cuda_run: tuple[Path, RunSummary], jpeg_shards: Path
) -> None:
    """The same model.pt on both devices, as users run them (cuDNN's TF32 convolutions on): a
    near-tie pixel may flip, no more; a wrong normalisation or decode on one path moves far more."""
    from pipeline.evaluation.evaluate import run_evaluation

    tmp, _ = cuda_run
    scores = {
        device: run_evaluation(
            EvaluateParams(
                model=str(tmp / "out" / "model.pt"),
                shards=str(jpeg_shards),
                device=device,
                out=str(tmp / f"eval-{device}"),
            )
        )
        for device in ("cpu", "cuda")
    }
    cpu, cuda = scores["cpu"], scores["cuda"]
    assert cuda.images == cpu.images == 4
    assert cuda.pixel_acc == pytest.approx(cpu.pixel_acc, abs=5e-3)
    assert cuda.miou == pytest.approx(cpu.miou, abs=2e-2)


@pytest.mark.gpu
@pytest.mark.slow
@CUDA
def test_a_cuda_run_resumes_after_its_driver_is_killed(jpeg_shards: Path, tmp_path: Path) -> None:
    """``danet train`` with use_gpu and a checkpoint per iteration, SIGKILLed after two of them;
    the same command resumes on the GPU from the newest checkpoint (not iteration 1) and ends."""
    values = {
        **ON_GPU,
        "epochs": 30,
        "eval_every_epochs": 10,
        "log_every": 1,
        "checkpoint_every": 1,
        "checkpoints_to_keep": 2,
        "run_name": "signals",
    }
    model, data, train, tracking = tiny_params(tmp_path, jpeg_shards, train=values)
    params = {
        "model": dataclasses.asdict(model),
        "data": dataclasses.asdict(data),
        "train": dataclasses.asdict(train),
        "mlflow": dataclasses.asdict(tracking),
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    command = [sys.executable, "-m", "pipeline", "train", "--params", str(tmp_path / "params.yaml")]
    stopped = stop_after_checkpoints(command, tmp_path, signal.SIGKILL, more=2)
    assert 0 < stopped < 60, "the run finished before SIGKILL"
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    resumed = re.search(r"resumed at iteration (\d+)", output)
    assert resumed and int(resumed.group(1)) >= stopped - 1, output[-3000:]
    assert latest_state(tmp_path / "ray", "signals").iteration == 60
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["final"]["iteration"] == 60
