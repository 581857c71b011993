"""Time to accuracy: train on a shards folder for a time budget, then evaluate; one JSON line.

    python bench/time_to_accuracy.py --shards data/shards-camvid --preset camvid --budget 480
    python bench/time_to_accuracy.py --shards S --params params.yaml --iters 1000 --set train.lr=0.02

The project's own loader, step and recipe (a params file or preset, ``--set`` overrides) on one
device (CUDA when present, else the CPU), without Ray, MLflow or DVC: it runs on a bare GPU
machine with torch, torchvision, timm and webdataset. The poly schedule is fitted to the budget:
``--calibrate`` iterations measure the speed first and count in the schedule, then the schedule
is set to end when the budget does. ``--iters`` fixes the schedule instead (comparisons on a busy
machine). The named splits are evaluated whole image + flip (the reference and base size of
``evaluate.*``). Images/s are wall clock over the training loop (loader included) and of the
step alone (one cached batch, on a copy of the model); MFU counts the step's FLOPs
(torch.utils.flop_counter) against the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import copy
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

from bench.peak import peak_bf16
from danet.metrics import summarize
from danet.model import Segmenter
from pipeline.config import Params, load_params
from pipeline.data.loader import TrainStream, train_loader
from pipeline.data.manifest import load_manifest, shard_refs
from pipeline.errors import TrainingDiverged
from pipeline.evaluation.evaluate import evaluate_model, protocol_of
from pipeline.training.job import TrainJob, prepare_job
from pipeline.training.loop import (
    poly_schedule,
    to_device,
    train_steps,
)
from pipeline.training.session import backbone_weights, build_loss, open_session


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
    parser.add_argument("--out", default="", help="also write the JSON here")
    return parser.parse_args()


def setup(args: argparse.Namespace) -> tuple[Params, TrainJob, torch.device]:
    params = load_params(args.params, [*args.sets, f"data.shards={args.shards}"], args.preset)
    job = prepare_job(params.model, params.data, dataclasses.replace(params.train, num_workers=1))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return params, job, device


def batch_fn(job: TrainJob, gpu: bool) -> Any:
    if not gpu:
        return to_device
    from pipeline.data.gpu import decode_batch

    return lambda batch, device: decode_batch(batch, job.data.crop_size, job.mean, job.std, device)


def step_rate(
    job: TrainJob,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: Any,
    device: torch.device,
    steps: int,
) -> tuple[float, float]:
    """Images/s of the step alone on one cached batch (a copy of model and optimizer), and the
    FLOPs of one step."""
    from torch.utils.flop_counter import FlopCounterMode

    model, opt = copy.deepcopy(model), copy.deepcopy(opt)
    sched = poly_schedule(opt, 10**9, job.train.poly_power)
    loss_fn = build_loss(job, device)
    fn = batch_fn(job, job.data.gpu_decode and device.type == "cuda")
    cached = [fn(batch, device)]

    def run(n: int) -> None:
        train_steps(
            model,
            itertools.repeat(cached[0], n),
            opt,
            sched,
            loss_fn,
            device,
            precision=job.train.precision,
            channels_last=job.train.channels_last,
            batch_fn=lambda b, d: b,
            log_every=10**9,
        )

    run(3)  # warm-up (and compilation)
    with FlopCounterMode(display=False) as counter:
        run(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return steps * cached[0][0].shape[0] / seconds, float(counter.get_total_flops())


def train(job: TrainJob, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    run = open_session(job, device=device, weights=backbone_weights(job.model))
    core, model, opt = run.core, run.model, run.optimizer
    t = job.train
    gpu = job.data.gpu_decode and device.type == "cuda"
    stream = TrainStream(
        job.train_shards,
        batch_size=t.batch_size,
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
    step_ips, step_flops = step_rate(job, model, opt, first, device, args.step_steps)
    loss_fn, fn = build_loss(job, device), batch_fn(job, gpu)
    windows: list[dict[str, Any]] = []  # every log window: finiteness at the training's cadence
    recoveries: list[dict[str, Any]] = []
    if run.recovery is not None:
        run.recovery.on_recover = lambda e: recoveries.append(
            {"iteration": e.verdict.iteration, "reason": e.verdict.reason, "back_to": e.back_to}
        )
    common = {
        "precision": t.precision,
        "channels_last": t.channels_last,
        "grad_clip": t.grad_clip,
        "batch_fn": fn,
        "log_every": t.log_every,
        "scaler": run.scaler,
        "recovery": run.recovery,
        "on_log": lambda r: windows.append(
            {"iteration": r.iteration, "loss": r.loss, "skipped": r.skipped_steps}
        ),
    }
    data = itertools.chain([first], batches)
    start = time.perf_counter()
    sched = poly_schedule(opt, args.iters or 10**9, t.poly_power, t.warmup_iters, t.warmup_ratio)

    def steps(n: int) -> None:
        train_steps(model, itertools.islice(data, n), opt, sched, loss_fn, device, **common)

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
    peak = peak_bf16(device)
    total = int(sched.last_epoch)
    return {
        "model": core,
        "iterations": total,
        "train_seconds": seconds,
        "budget_used": seconds / args.budget if not args.iters else None,
        "images_per_s_wall": total * t.batch_size / seconds,
        "images_per_s_step": step_ips,
        "step_tflop": step_flops / 1e12,
        "mfu": step_flops * step_ips / t.batch_size / peak
        if peak and t.precision != "fp32"
        else None,
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
        left = int((args.budget - (now - start)) / per_iter)
        sched.total_iters = done + max(0, left)
        if left <= 0:
            return
        # a quarter of what is left per chunk while the estimate settles; the last 2 s at once
        chunk = left if left * per_iter < 2.0 else max(1, left // 4)
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
