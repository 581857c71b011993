"""What can make a DANet training step non-finite, measured on a dataset and a recipe (issue 32).

    python bench/nan_causes.py --shards data/shards-camvid --preset camvid --epochs 20
    python bench/nan_causes.py --shards S --preset camvid --device cuda     # the GPU decode path

Each suspect of the CamVid divergence, checked on the real data and the preset's augmentation:
- ``labels``: training batches whose crops hold no labelled pixel (torch's mean cross-entropy
  over them is 0/0 = NaN; danet/losses.py now makes it 0): how many crops and batches, and the
  smallest labelled share of a crop, over ``--epochs`` epochs of the preset's random draws.
- ``augment``: the batches as training feeds them (``pipeline.data.gpu.decode_batch`` on
  ``--device`` when the preset decodes on the GPU, else the workers' path): any non-finite pixel,
  the flattest image (its standard deviation) -- a degenerate image the model cannot normalise.
- ``attention``: the position and channel attention under bf16 autocast against fp32 at feature
  magnitudes up to 100x a trained network's: finite or not, and the relative error.
- ``loss``: the loss of a batch whose labels are all ignore, and its gradient.
One JSON line per check; the last line sums them up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

from danet.attention import ChannelAttention, PositionAttention
from danet.losses import segmentation_loss
from pipeline.config import load_params
from pipeline.data.gpu import decode_batch
from pipeline.data.loader import RawBatch, TrainStream
from pipeline.training.job import prepare_job


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shards", required=True, help="a shards folder (danet shard)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of draws to check")
    parser.add_argument("--device", default="cpu", help="where the GPU decode path runs")
    return parser.parse_args()


def data_checks(args: argparse.Namespace) -> dict[str, Any]:
    """Labelled pixels per crop and finite, non-flat images over ``epochs`` of the recipe."""
    params = load_params(args.params, [*args.sets, f"data.shards={args.shards}"], args.preset)
    train = dataclasses.replace(params.train, num_workers=1)
    job = prepare_job(params.model, params.data, train)
    device = torch.device(args.device)
    gpu = job.data.gpu_decode
    stream = TrainStream(
        job.train_shards,
        batch_size=train.batch_size,
        batches_per_epoch=train.iters_per_epoch,
        augment=job.data,
        mean=job.mean,
        std=job.std,
        seed=train.seed,
        shuffle_buffer=job.data.shuffle_buffer,
        gpu_decode=gpu,
    )
    crops = batches = empty_crops = empty_batches = bad_pixels = 0
    least_labelled, flattest = 1.0, float("inf")
    start = time.perf_counter()
    for epoch in range(args.epochs):
        stream.set_epoch(epoch)
        for batch in stream:
            if isinstance(batch, RawBatch):  # the GPU path: decoded here, on --device
                images, labels = decode_batch(batch, job.data.crop_size, job.mean, job.std, device)
            else:
                images, labels = batch
            labelled = (labels != 255).flatten(1).float().mean(1)  # (B,)
            crops += len(labels)
            batches += 1
            empty_crops += int((labelled == 0).sum())
            empty_batches += int((labelled == 0).all())
            least_labelled = min(least_labelled, float(labelled.min()))
            bad_pixels += int((~torch.isfinite(images)).sum())
            flattest = min(flattest, float(images.flatten(1).std(1).min()))
    return {
        "check": "data",
        "preset": args.preset,
        "epochs": args.epochs,
        "batch": train.batch_size,
        "crop": job.data.crop_size,
        "decode": f"gpu path on {device}" if gpu else "workers",
        "batches": batches,
        "crops": crops,
        "crops_without_labels": empty_crops,
        "batches_without_labels": empty_batches,
        "least_labelled_share": least_labelled,
        "non_finite_pixels": bad_pixels,
        "flattest_image_std": flattest,
        "seconds": time.perf_counter() - start,
    }


def attention_checks(device: torch.device) -> dict[str, Any]:
    """PAM (the efficient path where ``auto`` takes it) and CAM in bf16 autocast vs fp32, on
    features of growing magnitude (post-ReLU, 512 channels, a 44x44 map as at crop 352)."""
    torch.manual_seed(0)
    rows = []
    pam, cam = PositionAttention(512, impl="efficient").to(device), ChannelAttention().to(device)
    with torch.no_grad():
        for module in (pam, cam):
            module.gamma.fill_(1.0)
    for scale in (1.0, 10.0, 100.0):
        x = (torch.randn(2, 512, 44, 44, device=device) * scale).relu()
        for name, module in (("pam", pam), ("cam", cam)):
            with torch.no_grad():
                ref = module(x)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    low = module(x).float()
            err = float((low - ref).norm() / ref.norm())
            rows.append(
                {
                    "module": name,
                    "scale": scale,
                    "finite": bool(torch.isfinite(low).all()),
                    "rel_err": err,
                }
            )
    return {"check": "attention", "device": str(device), "rows": rows}


def loss_check() -> dict[str, Any]:
    logits = torch.randn(2, 11, 16, 16, requires_grad=True)
    labels = torch.full((2, 16, 16), 255)
    loss, _ = segmentation_loss({"out": logits}, labels)
    loss.backward()
    assert logits.grad is not None
    return {
        "check": "loss",
        "all_ignore_loss": float(loss),
        "all_ignore_grad_finite": bool(torch.isfinite(logits.grad).all()),
        "reference_torch_mean": float(
            torch.nn.functional.cross_entropy(logits, labels, ignore_index=255)
        ),
    }


def main() -> None:
    args = parse()
    data = data_checks(args)
    attention = attention_checks(torch.device(args.device))
    loss = loss_check()
    for line in (data, attention, loss):
        print(json.dumps(line), flush=True)
    suspects = {
        "batch_without_labels": data["batches_without_labels"] > 0,
        "degenerate_augmented_image": data["non_finite_pixels"] > 0
        or data["flattest_image_std"] < 1e-3,
        "bf16_attention": not all(r["finite"] for r in attention["rows"]),
        "all_ignore_loss_nan": loss["all_ignore_loss"] != loss["all_ignore_loss"],
    }
    print(json.dumps({"check": "summary", "ruled_in": [k for k, v in suspects.items() if v]}))


if __name__ == "__main__":
    main()
