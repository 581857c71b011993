"""Images/s and MFU of a training step (forward, backward, SGD step) for DANet and the FCN baseline.

    python bench/train_step.py                                  # CPU: models, then 1 vs 2 Ray workers
    python bench/train_step.py --device cuda --backbone resnet50d resnet101d --crop 768 --batch 8 \\
        --matrix --no-ray                                       # GPU: precision, layout, attention, compile
    python bench/train_step.py --matrix --no-compile --no-ray   # CPU: bf16 autocast (native bf16 CPUs)
    python bench/train_step.py --device cuda --backbone resnet101d --crop 768 --batch 8 --no-ray \\
        --profile                                               # the top kernels of one step

The step is built by the training session's own builder (pipeline/training/builder.py
``build_step``: cuDNN's autotuner on CUDA, channels_last, precision, torch.compile, the DANet
losses, the fused SGD with the head group, the poly schedule) for a job of the given
architecture and recipe, and run by ``train_steps`` on one batch already on the device, after
warm-up steps: the step alone, without the loader. MFU counts one step's FLOPs with the same
function a run logs it with (pipeline/training/flops.py) against the device's peak in the row's
precision (a CPU's: its measured matmul peak). The Ray part runs the same step inside a
TorchTrainer with 1 and 2 CPU workers sharing this machine's cores (global images/s).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

from pipeline.errors import TrainingDiverged
from pipeline.sections import DataParams, ModelParams, TrainParams
from pipeline.training.builder import Step, build_step
from pipeline.training.flops import device_peak, step_flops
from pipeline.training.job import TrainJob
from pipeline.training.prefetch import on_device

# the matrix's rows: (precision, attention, channels_last, compile), each against the row before
# it (fp16: loss-scaled, what a V100/T4 runs; against bf16 on the same GPU). bf16 +
# channels_last is what params.yaml trains.
MATRIX = [
    ("fp32", "auto", False, False),
    ("bf16", "auto", False, False),
    ("fp16", "auto", False, False),
    ("bf16", "auto", True, False),
    ("bf16", "dense", True, False),
    ("bf16", "auto", True, True),
]


def bench_job(
    backbone: str,
    head: str,
    crop: int,
    batch: int,
    precision: str = "fp32",
    attention: str = "auto",
    channels_last: bool = False,
    compile_model: bool = False,
    num_classes: int = 19,
) -> TrainJob:
    """A training job of this architecture and recipe without shards (params.yaml's defaults
    otherwise): what ``build_step`` builds a run's step from."""
    return TrainJob(
        model=ModelParams(backbone=backbone, head=head, attention_impl=attention),
        data=DataParams(crop_size=crop, gpu_decode=False),
        train=TrainParams(
            batch_size=batch,
            precision=precision,
            channels_last=channels_last,
            compile=compile_model,
            epochs=10_000,  # a schedule the timed steps stay far from the end of
        ),
        dataset="bench",
        classes=tuple(f"class{i}" for i in range(num_classes)),
        palette=((0, 0, 0),) * num_classes,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        train_shards=(),
        val_shards=(),
        manifest_sha256="",
        class_pixels=(1,) * num_classes,
        class_image_pixels=(1,) * num_classes,
    )


def device_batch(job: TrainJob, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One random batch of the job's size, on the device."""
    g = torch.Generator().manual_seed(0)
    crop, n, k = job.data.crop_size, job.train.worker_batch, job.num_classes
    x = torch.randn(n, 3, crop, crop, generator=g)
    y = torch.randint(0, k, (n, crop, crop), generator=g)
    return x.to(device), y.to(device)


def timed(step: Step, batch: Any, steps: int) -> float:
    """Seconds of ``steps`` steps on ``batch``, as training runs them (one host read at the end,
    where training reads once per log window)."""
    sync = torch.cuda.synchronize if step.device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    with contextlib.suppress(TrainingDiverged):  # a diverging recipe's steps took their time
        step.run([batch] * steps, batch_fn=on_device, log_every=10**9)
    sync()
    return time.perf_counter() - start


def step_rate(
    job: TrainJob, device: str, steps: int, flops: list[float] | None = None, repeats: int = 1
) -> float:
    """Images/s of ``steps`` timed training steps in this process, after 2 warm-up steps (and
    compilation): the best of ``repeats`` such runs (on a shared machine the least disturbed);
    ``flops`` receives the FLOPs of one step when given."""
    dev = torch.device(device)
    step = build_step(job, dev)
    batch = device_batch(job, dev)
    timed(step, batch, 2)
    seconds = min(timed(step, batch, steps) for _ in range(repeats))
    if flops is not None:
        t = job.train
        n = t.worker_batch
        flops.append(
            step_flops(step.core, n, job.data.crop_size, dev, t.precision, t.channels_last)
        )
    return steps * job.train.worker_batch / seconds


def compile_ab(job: TrainJob, device: str, steps: int, rounds: int = 6) -> dict[str, list[float]]:
    """Images/s of chunks of ``steps`` steps, eager and torch.compile'd builds of ``job``
    alternating in one process (after warm-up and compilation): both see the same machine."""
    dev = torch.device(device)
    built = {
        mode: build_step(
            dataclasses.replace(job, train=dataclasses.replace(job.train, compile=c)), dev
        )
        for mode, c in (("eager", False), ("compiled", True))
    }
    batch = device_batch(job, dev)
    rates: dict[str, list[float]] = {mode: [] for mode in built}
    for step in built.values():
        timed(step, batch, 3)  # warm-up; compilation, forward and backward
    for _ in range(rounds):
        for mode, step in built.items():
            rates[mode].append(steps * job.train.worker_batch / timed(step, batch, steps))
    return rates


def profile(job: TrainJob, device: str, rows: int = 20) -> str:
    """torch.profiler's table of the top operators and kernels of 3 steps, by their own time on
    the device (CUDA) or the CPU."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    dev = torch.device(device)
    step = build_step(job, dev)
    batch = device_batch(job, dev)
    timed(step, batch, 3)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        timed(step, batch, 3)
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    return str(prof.key_averages().table(sort_by=key, row_limit=rows))


def ray_rate(workers: int, job: TrainJob, steps: int) -> float:
    """Global images/s of the same step in a TorchTrainer with ``workers`` CPU workers (the
    job's batch per worker)."""
    import os

    import ray
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def worker(config: dict[str, Any]) -> None:
        ctx = ray.train.get_context()
        step = build_step(
            config["job"],
            torch.device("cpu"),
            rank=ctx.get_world_rank(),
            world=ctx.get_world_size(),
            prepare=ray.train.torch.prepare_model,
        )
        batch = device_batch(config["job"], torch.device("cpu"))
        timed(step, batch, 2)
        seconds = timed(step, batch, config["steps"])
        images = ctx.get_world_size() * config["job"].train.worker_batch * config["steps"]
        # Train V2 keeps metrics in Result only when they come with a checkpoint.
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(
                {"images_per_s": images / seconds},
                checkpoint=checkpoint if ctx.get_world_rank() == 0 else None,
            )

    cpus = max(1, (os.cpu_count() or 2) // workers)
    trainer = TorchTrainer(
        worker,
        train_loop_config={"job": job, "steps": steps},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=f"bench-{workers}w-{time.time_ns()}", storage_path="/tmp/danet-bench"
        ),
    )
    result = trainer.fit()
    assert result.metrics is not None
    return float(result.metrics["images_per_s"])


def matrix(args: argparse.Namespace, backbone: str) -> None:
    """The matrix's rows for one backbone, with MFU."""
    for precision, attention, cl, comp in MATRIX:
        if (comp and args.no_compile) or (precision == "fp16" and args.device == "cpu"):
            continue  # fp16 is the GPU's (a CPU without fp16 units emulates it)
        job = bench_job(backbone, "danet", args.crop, args.batch, precision, attention, cl, comp)
        flops: list[float] = []
        r = step_rate(job, args.device, args.steps, flops, args.repeats)
        peak = device_peak(args.device, precision)
        mfu = f"{flops[0] * r / args.batch / peak:7.1%}" if peak else "      -"
        print(
            f"{backbone:>11} {'danet':>6} {precision:>5} {attention:>9} "
            f"{'yes' if cl else 'no':>7} {'yes' if comp else 'no':>7} | {r:7.2f} {mfu}  "
            f"({flops[0] / 1e12:.3f} TFLOP/step; peak {peak / 1e12 if peak else 0:.3g} TFLOP/s)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backbone", nargs="+", default=["resnet18d"])
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs of --steps steps; the best is shown"
    )
    parser.add_argument(
        "--matrix",
        action="store_true",
        help="DANet rows: fp32, bf16, fp16, +channels_last, dense, +compile; MFU",
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the compile row (minutes on a CPU)"
    )
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only the top kernels of the first backbone's bf16 + channels_last step",
    )
    parser.add_argument("--rows", type=int, default=20, help="rows of the --profile table")
    parser.add_argument(
        "--compile-ab",
        action="store_true",
        help="only eager vs torch.compile (bf16, channels_last), alternating chunks",
    )
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads; crop "
        f"{args.crop}, batch {args.batch}, best of {args.repeats} x {args.steps} timed steps"
    )
    if args.profile:
        job = bench_job(args.backbone[0], "danet", args.crop, args.batch, "bf16", "auto", True)
        print(profile(job, args.device, args.rows))
        return
    if args.compile_ab:
        job = bench_job(args.backbone[0], "danet", args.crop, args.batch, "bf16", "auto", True)
        chunked = compile_ab(job, args.device, args.steps, max(2, args.repeats))
        for mode, r in chunked.items():
            chunks = ", ".join(f"{x:.1f}" for x in r)
            print(
                f"{mode:>9}: median {statistics.median(r):7.2f}, best {max(r):7.2f} img/s ({chunks})"
            )
        ratio = statistics.median(chunked["compiled"]) / statistics.median(chunked["eager"])
        print(f"compiled / eager: {ratio:.2f} (medians)")
        return

    print(
        f"\n{'backbone':>11} {'model':>6} {'prec':>5} {'attention':>9} {'ch_last':>7} {'compile':>7} | {'img/s':>7} {'MFU':>7}"
    )
    for backbone in args.backbone:
        rates = {}
        for head in ("danet", "fcn"):
            job = bench_job(backbone, head, args.crop, args.batch)
            rates[head] = step_rate(job, args.device, args.steps, repeats=args.repeats)
            print(
                f"{backbone:>11} {head:>6} {'fp32':>5} {'auto':>9} {'no':>7} {'no':>7} | {rates[head]:7.2f}",
                flush=True,
            )
        print(f"{'':>11} FCN / DANet speed: {rates['fcn'] / rates['danet']:.2f}")
        if args.matrix:
            matrix(args, backbone)

    if args.device == "cpu" and not args.no_ray:
        import ray

        ray.init(
            num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False
        )
        print(f"\nRay Train on CPU ({args.backbone[0]}, DANet): global images/s")
        one = ray_rate(1, bench_job(args.backbone[0], "danet", args.crop, args.batch), args.steps)
        print(f"  1 worker  x 2 CPUs: {one:7.2f}", flush=True)
        two = ray_rate(2, bench_job(args.backbone[0], "danet", args.crop, args.batch), args.steps)
        print(f"  2 workers x 1 CPU:  {two:7.2f}   (2 / 1 workers: {two / one:.2f})")
        ray.shutdown()


if __name__ == "__main__":
    main()
