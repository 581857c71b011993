"""Whole-image inference: images/s and peak memory of DANet, dense vs efficient position attention.

    python bench/inference.py                                        # CPU: R18d at 256x512
    python bench/inference.py --device cuda --backbone resnet101d --size 1024x2048 --bf16

The forward pass as `danet evaluate --set evaluate.mode=whole` runs it (the Segmenter, fused
output only), batch 1, channels_last, on random pixels; timed over ``--repeats`` passes after
two warm-up passes. Peak memory on CUDA is ``torch.cuda.max_memory_allocated`` above the
weights; on CPU it is not measured (RSS is shared with the weights' allocation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

from danet import DANetConfig, build_danet
from danet.model import Segmenter


def measure(
    backbone: str, height: int, width: int, impl: str, device: str, bf16: bool, repeats: int
) -> dict[str, float | None]:
    torch.manual_seed(0)
    config = DANetConfig(num_classes=19, backbone=backbone, attention_impl=impl)  # type: ignore[arg-type]
    model = Segmenter(build_danet(config), (0.5,) * 3, (0.25,) * 3).to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, height, width, device=device).to(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()

    forward()
    forward()
    peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward()
        peak = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    start = time.perf_counter()
    for _ in range(repeats):
        forward()
    return {"images_per_s": round(repeats / (time.perf_counter() - start), 3), "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backbone", default="resnet18d")
    parser.add_argument("--size", default="256x512", help="HxW")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", nargs="+", default=["efficient", "dense"])
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    h, w = (int(v) for v in args.size.split("x"))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    for impl in args.impls:
        row = measure(args.backbone, h, w, impl, args.device, args.bf16, args.repeats)
        print(
            json.dumps(
                {
                    "bench": "inference",
                    "device": name,
                    "torch": torch.__version__,
                    "backbone": args.backbone,
                    "size": args.size,
                    "bf16": args.bf16,
                    "attention": impl,
                    **row,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
