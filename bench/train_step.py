"""Images/s of a training step (forward, backward, SGD step) for DANet and the FCN baseline.

    python bench/train_step.py                                  # CPU: models, then 1 vs 2 Ray workers
    python bench/train_step.py --device cuda --backbone resnet50d resnet101d --crop 768 --batch 8 \
        --matrix                                                # GPU: precision, layout, attention, compile, MFU
    python bench/train_step.py --matrix --no-compile --no-ray   # CPU: bf16 autocast (native bf16 CPUs)

The step is the real one (pipeline/loop.py: train_steps with the three DANet losses) on random
batches, timed after warm-up steps. The Ray part runs the same step inside a TorchTrainer with 1
and 2 CPU workers sharing this machine's cores (global images/s = workers x batch / step time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

from bench.peak import peak_bf16
from danet import DANetConfig, build_danet
from danet.losses import segmentation_loss
from pipeline.training.loop import build_optimizer, grad_scaler, poly_schedule, train_steps

# the GPU rows: (precision, attention, channels_last, compile), each against the row before it
# (fp16: loss-scaled, what a V100/T4 runs; against bf16 on the same GPU)
MATRIX = [
    ("fp32", "auto", False, False),
    ("bf16", "auto", False, False),
    ("fp16", "auto", False, False),
    ("bf16", "auto", True, False),
    ("bf16", "dense", True, False),
    ("bf16", "auto", True, True),
]


def step_rate(
    backbone: str, head: str, crop: int, batch: int, steps: int, device: str,
    precision: str = "fp32", attention: str = "auto", channels_last: bool = False,
    compile_model: bool = False, flops: list[float] | None = None,
) -> float:  # fmt: skip
    """Images/s of ``steps`` timed training steps in this process (median of per-step rates);
    ``flops`` receives the FLOPs of one step (torch.utils.flop_counter) when given."""
    torch.manual_seed(0)
    config = DANetConfig(num_classes=19, backbone=backbone, head=head, attention_impl=attention)  # type: ignore[arg-type]
    model = build_danet(config).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, 0.01, 0.9, 1e-4, 10.0)
    scheduler = poly_schedule(optimizer, 10_000, 0.9)
    runner: Any = torch.compile(model) if compile_model else model
    x = torch.randn(batch, 3, crop, crop)
    y = torch.randint(0, 19, (batch, crop, crop))
    dev = torch.device(device)
    scaler = grad_scaler(precision, dev)
    times = []

    def step() -> None:
        train_steps(
            runner,
            [(x, y)],
            optimizer,
            scheduler,
            segmentation_loss,
            dev,
            precision=precision,
            scaler=scaler,
            channels_last=channels_last,
        )
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for i in range(steps + 2):  # 2 warm-up steps (and compilation)
        start = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    if flops is not None and not compile_model:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        flops.append(float(counter.get_total_flops()))
    return batch / statistics.median(times)


def ray_rate(workers: int, backbone: str, head: str, crop: int, batch: int, steps: int) -> float:
    """Global images/s of the same step in a TorchTrainer with ``workers`` CPU workers."""
    import os

    import ray
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def worker(config: dict[str, Any]) -> None:
        torch.manual_seed(0)
        model = ray.train.torch.prepare_model(
            build_danet(
                DANetConfig(num_classes=19, backbone=config["backbone"], head=config["head"])
            )
        )
        core: Any = model.module if hasattr(model, "module") else model
        optimizer = build_optimizer(core, 0.01, 0.9, 1e-4, 10.0)
        scheduler = poly_schedule(optimizer, 10_000, 0.9)
        x = torch.randn(config["batch"], 3, config["crop"], config["crop"])
        y = torch.randint(0, 19, (config["batch"], config["crop"], config["crop"]))
        times = []
        for i in range(config["steps"] + 2):
            start = time.perf_counter()
            train_steps(
                model, [(x, y)], optimizer, scheduler, segmentation_loss, torch.device("cpu")
            )
            if i >= 2:
                times.append(time.perf_counter() - start)
        ctx = ray.train.get_context()
        metrics = {
            "images_per_s": ctx.get_world_size() * config["batch"] / statistics.median(times)
        }
        # Train V2 keeps metrics in Result only when they come with a checkpoint.
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint if ctx.get_world_rank() == 0 else None)

    cpus = max(1, (os.cpu_count() or 2) // workers)
    trainer = TorchTrainer(
        worker,
        train_loop_config={
            "backbone": backbone,
            "head": head,
            "crop": crop,
            "batch": batch,
            "steps": steps,
        },
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=f"bench-{workers}w-{time.time_ns()}", storage_path="/tmp/danet-bench"
        ),
    )
    result = trainer.fit()
    assert result.metrics is not None
    return float(result.metrics["images_per_s"])


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
        "--matrix",
        action="store_true",
        help="DANet rows: fp32, bf16, fp16, +channels_last, dense, +compile; MFU",
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the compile row (minutes on a CPU)"
    )
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads; "
          f"crop {args.crop}, batch {args.batch}, {args.steps} timed steps")  # fmt: skip

    print(
        f"\n{'backbone':>11} {'model':>6} {'prec':>5} {'attention':>9} {'ch_last':>7} {'compile':>7} | {'img/s':>7}"
    )
    for backbone in args.backbone:
        rates = {}
        for head in ("danet", "fcn"):
            rates[head] = step_rate(backbone, head, args.crop, args.batch, args.steps, args.device)
            print(
                f"{backbone:>11} {head:>6} {'fp32':>5} {'auto':>9} {'no':>7} {'no':>7} | {rates[head]:7.2f}",
                flush=True,
            )
        print(f"{'':>11} FCN / DANet speed: {rates['fcn'] / rates['danet']:.2f}")
        if args.matrix:
            flops: list[float] = []
            peak = peak_bf16(args.device)
            for precision, attention, cl, comp in MATRIX:
                if (comp and args.no_compile) or (precision == "fp16" and args.device == "cpu"):
                    continue  # fp16 is the GPU's (a CPU without fp16 units emulates it)
                r = step_rate(
                    backbone,
                    "danet",
                    args.crop,
                    args.batch,
                    args.steps,
                    args.device,
                    precision,
                    attention,
                    cl,
                    comp,
                    flops,
                )
                half = precision != "fp32"
                mfu = f"{flops[0] * r / args.batch / peak:7.1%}" if peak and half else ""
                print(
                    f"{backbone:>11} {'danet':>6} {precision:>5} {attention:>9} "
                    f"{'yes' if cl else 'no':>7} {'yes' if comp else 'no':>7} | {r:7.2f} {mfu}",
                    flush=True,
                )
            print(
                f"{'':>11} one step: {flops[0] / 1e12:.2f} TFLOP; MFU against the dense bf16 peak"
            )

    if args.device == "cpu" and not args.no_ray:
        import ray

        ray.init(
            num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False
        )
        print(f"\nRay Train on CPU ({args.backbone[0]}, DANet): global images/s")
        one = ray_rate(1, args.backbone[0], "danet", args.crop, args.batch, args.steps)
        print(f"  1 worker  x 2 CPUs: {one:7.2f}", flush=True)
        two = ray_rate(2, args.backbone[0], "danet", args.crop, args.batch, args.steps)
        print(f"  2 workers x 1 CPU:  {two:7.2f}   (2 / 1 workers: {two / one:.2f})")
        ray.shutdown()


if __name__ == "__main__":
    main()
