"""Time to accuracy: train on a shards folder for a time budget, then evaluate; one JSON line.

    python bench/time_to_accuracy.py --shards data/shards-camvid --preset camvid --budget 480
    python bench/time_to_accuracy.py --shards S --params params.yaml --iters 1000 --set train.lr=0.02

The project's own loader, step and recipe (a params file or preset, ``--set`` overrides) on one
device (CUDA when present, else the CPU), without Ray, MLflow or DVC: it runs on a bare GPU
machine with torch, torchvision, timm and webdataset. The poly schedule is fitted to the budget:
``--calibrate`` iterations measure the speed first and count in the schedule, then the schedule
is set to end when the budget does. ``--iters`` fixes the schedule instead (comparisons on a busy
machine). The named splits are evaluated whole image + flip (the reference and base size of
``evaluate.*``). The step is the training session's (pipeline/training/builder.py, through
``open_session``) and its batches come as training's do (pipeline/training/prefetch.py: made
ahead on a side stream on CUDA; ``--prefetch 0`` makes them in turn between steps, the old way).
Images/s are wall clock over the training loop (loader included) and of the step alone (one
cached batch, a step built by the same builder); MFU counts the step's FLOPs as a run does
(pipeline/training/flops.py) against the device's peak in the run's precision (a CPU's: its
measured matmul peak): ``mfu`` at the step's rate, ``mfu_wall`` at the loop's.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

from bench.train_step import timed
from danet.metrics import summarize
from danet.model import Segmenter
from pipeline.config import Params, load_params
from pipeline.data.loader import TrainStream, train_loader
from pipeline.data.manifest import load_manifest, shard_refs
from pipeline.errors import TrainingDiverged
from pipeline.evaluation.evaluate import evaluate_model, protocol_of
from pipeline.training.builder import build_step, step_options
from pipeline.training.flops import device_peak, step_flops
from pipeline.training.job import TrainJob, prepare_job
from pipeline.training.loop import train_steps
from pipeline.training.prefetch import Prefetcher, on_device
from pipeline.training.session import backbone_weights, open_session


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shards", required=True, help="a shards folder (danet shard)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds of training")
    parser.add_argument("--iters", type=int, default=0, help="a fixed schedule instead of --budget")
    parser.add_argument(
        "--calibrate", type=int, default=30, help="iterations that measure the speed"
    )
    parser.add_argument("--splits", default="val", help="comma-separated splits to evaluate")
    parser.add_argument(
        "--step-steps", type=int, default=10, help="timed steps of the step-only figure"
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=-1,
        help="batches made ahead by a thread (0: in turn); default: what training does",
    )
    parser.add_argument("--out", default="", help="also write the JSON here")
    return parser.parse_args()


def setup(args: argparse.Namespace) -> tuple[Params, TrainJob, torch.device]:
    params = load_params(args.params, [*args.sets, f"data.shards={args.shards}"], args.preset)
    job = prepare_job(params.model, params.data, dataclasses.replace(params.train, num_workers=1))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return params, job, device


def step_rate(job: TrainJob, batch: Any, device: torch.device, steps: int) -> tuple[float, float]:
    """Images/s of the step alone on one cached micro-batch (a step built as training builds
    it, at the same size), and the FLOPs of one micro-batch."""
    step = build_step(job, device)
    cached = step.batch_fn(batch, device)
    timed(step, cached, 3)  # warm-up (cuDNN's autotuning, compilation)
    seconds = timed(step, cached, steps * job.train.accumulate)
    t = job.train
    flops = step_flops(
        step.core,
        images=t.worker_batch,
        crop=job.data.crop_size,
        device=device,
        precision=t.precision,
        channels_last=t.channels_last,
    )
    return steps * t.batch_size / seconds, flops


def train(job: TrainJob, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    t = job.train
    gpu = job.data.gpu_decode and device.type == "cuda"
    stream = TrainStream(  # in micro-batches, as training's
        job.train_shards,
        batch_size=t.worker_batch,
        batches_per_epoch=10**6,
        augment=job.data,
        mean=job.mean,
        std=job.std,
        seed=t.seed,
        shuffle_buffer=job.data.shuffle_buffer,
        gpu_decode=gpu,
    )
    batches = iter(train_loader(stream, job.data.loader_workers, pin_memory=device.type == "cuda"))
    first = next(batches)
    step_ips, flops = step_rate(job, first, device, args.step_steps)
    run = open_session(job, device=device, weights=backbone_weights(job.model))
    core, model, opt = run.core, run.model, run.optimizer
    depth = run.prefetch if args.prefetch < 0 else args.prefetch
    data = Prefetcher(
        itertools.chain([first], batches),
        run.batch_fn,
        device,
        depth=depth,
        channels_last=t.channels_last,
    )
    windows: list[dict[str, Any]] = []  # every log window: finiteness at the training's cadence
    recoveries: list[dict[str, Any]] = []
    if run.recovery is not None:
        run.recovery.on_recover = lambda e: recoveries.append(
            {"iteration": e.verdict.iteration, "reason": e.verdict.reason, "back_to": e.back_to}
        )
    common = {
        **step_options(t),
        "batch_fn": on_device,  # ``data`` made them
        "log_every": t.log_every,
        "scaler": run.scaler,
        "recovery": run.recovery,
        "on_log": lambda r: windows.append(
            {"iteration": r.iteration, "loss": r.loss, "skipped": r.skipped_steps}
        ),
    }
    start = time.perf_counter()
    # the session's own schedule, its end moved: a second scheduler on the same optimizer would
    # apply the first lr factor twice (the warm-up's 1e-6 for good: lr x 1e-6 throughout)
    sched = run.scheduler
    sched.total_iters = args.iters or 10**9

    def steps(n: int) -> None:
        micro = itertools.islice(data, n * t.accumulate)
        train_steps(model, micro, opt, sched, run.loss_fn, device, **common)

    diverged: dict[str, Any] | None = None
    try:
        if args.iters:
            steps(args.iters)
        else:
            calibrate(sched, steps, args, start)
    except TrainingDiverged as err:  # no recovery left: the first bad window is named
        diverged = {"iteration": err.iteration, "loss": str(err.loss)}
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    data.close()
    peak = device_peak(device, t.precision)
    total = int(sched.last_epoch)
    wall = total * t.batch_size / seconds
    return {
        "model": core,
        "iterations": total,
        "train_seconds": seconds,
        "budget_used": seconds / args.budget if not args.iters else None,
        "images_per_s_wall": wall,
        "images_per_s_step": step_ips,
        "loop_vs_step": wall / step_ips,
        "prefetch": depth,
        "gpu_decode": gpu,
        "step_tflop": flops * t.accumulate / 1e12,  # its micro-batches
        "mfu": flops * step_ips / t.worker_batch / peak if peak else None,
        "mfu_wall": flops * wall / t.worker_batch / peak if peak else None,
        "windows": len(windows),
        "last_loss": windows[-1]["loss"] if windows else None,
        "skipped_steps": sum(w["skipped"] or 0 for w in windows),
        "recoveries": recoveries,
        "diverged": diverged,
    }


def calibrate(
    sched: Any, steps: Callable[[int], None], args: argparse.Namespace, start: float
) -> None:
    """Fit the poly schedule to the budget: ``--calibrate`` iterations measure the speed (the
    first third is warm-up: cuDNN's autotuning, the loader's workers), then the run trains in
    chunks, each re-measuring the speed and moving the schedule's end so that it lands on the
    budget (the chainable schedule goes on from the current lr to 0 at the new end). The first
    estimate alone ran 12% short on an H200 (157.5 of 180 s): early iterations are slower."""
    warm = max(1, args.calibrate // 3)
    steps(warm)
    done, mark = warm, time.perf_counter()
    chunk = max(1, args.calibrate - warm)
    while True:
        steps(chunk)
        done += chunk
        now = time.perf_counter()
        per_iter = (now - mark) / chunk
        left = round((args.budget - (now - start)) / per_iter)  # off by half a step at most
        sched.total_iters = done + max(0, left)
        if left <= 0:
            return
        # half of what is left per chunk while the estimate settles; the last 1% at once (a
        # slower last chunk overshoots by at most a share of that)
        chunk = left if left * per_iter < 0.01 * args.budget else max(1, left // 2)
        mark = now


def evaluate(
    params: Params, job: TrainJob, model: torch.nn.Module, splits: list[str], device: torch.device
) -> dict[str, Any]:
    manifest = load_manifest(job.data.shards)
    protocol = dataclasses.replace(
        protocol_of(params.evaluate), mode="whole", flip=True, scales=(1.0,)
    )
    segmenter = Segmenter(model, job.mean, job.std).eval()  # type: ignore[arg-type]
    results: dict[str, Any] = {"protocol": protocol.name}
    for split in splits:
        start = time.perf_counter()
        matrix, _ = evaluate_model(
            segmenter,
            job.num_classes,
            shard_refs(manifest, split),
            protocol,
            device,
            bf16=params.evaluate.bf16,
            progress=False,
        )
        scores = summarize(matrix)
        results[split] = {
            "miou": scores["miou"],
            "pixel_acc": scores["pixel_acc"],
            "iou_per_class": dict(zip(job.classes, scores["iou_per_class"], strict=True)),
            "images_per_s": manifest.split(split).samples / (time.perf_counter() - start),
        }
    return results


def main() -> None:
    args = parse()
    params, job, device = setup(args)
    trained = train(job, args, device)
    evaluation = evaluate(
        params, job, trained.pop("model"), [s for s in args.splits.split(",") if s], device
    )
    line = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "overrides": args.sets,
        "budget_s": None if args.iters else args.budget,
        "batch": job.train.batch_size,
        "crop": job.data.crop_size,
        "backbone": job.model.backbone,
        "head": job.model.head,
        **trained,
        **evaluation,
    }
    text = json.dumps(line)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
