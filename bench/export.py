"""Inference of one model four ways: images/s and peak memory at 360x480 and 1024x2048, batch 1.

    python bench/export.py                                  # random DANet-R18d (the demo's net)
    python bench/export.py --model outputs/train/model.pt --shards data/shards
    python bench/export.py --sizes 64x96 --repeats 1        # a smoke run (the tests)

Rows, all with the same ``--threads`` (default: every core): torch eager fp32 (the ``Segmenter``
as ``danet evaluate`` runs it, PAM ``auto``), torch with CPU bf16 autocast (energies fp32),
ONNX Runtime fp32 (``danet export``: the fused attention), ONNX Runtime INT8 (``--quantize int8``,
calibrated on ``--shards``' train split, else on image-like noise), and ONNX Runtime fp32 with the
standard (MatMul/Softmax) attention, which holds the N x N map. Each row runs in its own process:
``peak_mib`` is that process's peak RSS and ``above_idle_mib`` the part above the loaded model.
Timed as the best of ``--repeats`` passes after one warm-up pass (the cores of this VM are
shared: steal only ever adds time), the median beside it. ``gflops`` is the eager fp32 forward's
FLOP count (torch.utils.flop_counter, multiply-add = 2) and ``of_peak`` the achieved FLOP/s over
the CPU's fp32 peak, ``--peak-gflops`` (default this machine's: an AMD EPYC with AVX-512 but no AVX-VNNI, i.e. Zen 4,
whose two 256-bit FMA pipes give 32 fp32 FLOP/cycle: 2 cores x 3.7 GHz boost x 32 = 237 GFLOP/s;
at the 2.6 GHz base clock it would be 166, which eager fp32 already passes at 360x480, so the
cores do boost). A 4096^3 fp32 matmul's rate is printed beside it, ``sgemm_gflops``. ``--rows`` picks rows; the GPU rows (``GPU_ROWS``, bench/gpu.sh export) need
a CUDA device and onnxruntime-gpu. Prints one JSON line per row, then the ratios
against eager fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

ROWS = ("torch-fp32", "torch-bf16", "ort-fp32", "ort-int8", "ort-fp32-standard")
# the GPU rows (bench/gpu.sh export): torch on CUDA, ONNX Runtime's CUDA and TensorRT providers
GPU_ROWS = ("torch-cuda-fp32", "torch-cuda-bf16", "ort-cuda-fp32", "ort-trt-fp16", "ort-trt-int8")
FILE_OF = {
    "ort-fp32": "fused",
    "ort-int8": "int8",
    "ort-fp32-standard": "standard",
    "ort-cuda-fp32": "fused",
    "ort-trt-fp16": "standard",  # TensorRT has no com.microsoft ops
    "ort-trt-int8": "int8-standard",
}
PROVIDERS: dict[str, list] = {
    "ort-cuda-fp32": ["CUDAExecutionProvider"],
    "ort-trt-fp16": [
        ("TensorrtExecutionProvider", {"trt_fp16_enable": True}),
        "CUDAExecutionProvider",
    ],
    "ort-trt-int8": [
        ("TensorrtExecutionProvider", {"trt_int8_enable": True}),
        "CUDAExecutionProvider",
    ],
}


def peak_mib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not inherit the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sgemm_gflops(threads: int) -> float:
    """The CPU's practical fp32 peak: a 4096^3 matmul's FLOP/s at ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    a @ b
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    return 2 * 4096**3 * 3 / (time.perf_counter() - start) / 1e9


def load_torch(model: str) -> Any:
    import torch

    from danet import DANetConfig, build_danet
    from danet.model import Segmenter
    from pipeline.artifacts.modelfile import load_model_file

    if model:
        return load_model_file(model)[0]
    torch.manual_seed(0)
    net = build_danet(DANetConfig(num_classes=11, backbone="resnet18d"))
    for name, p in net.named_parameters():
        if name.endswith("gamma"):
            p.data.fill_(0.7)  # random init has gamma 0: the attention would be skipped
    return Segmenter(net, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).eval()


def run_row(row: str, size: tuple[int, int], args: argparse.Namespace, files: dict) -> dict:
    """One row in this process: load, warm up, time; peak RSS."""
    import numpy as np
    import torch

    from pipeline.artifacts.onnxgraph import probe_image

    torch.set_num_threads(args.threads)
    image = probe_image((1, 3, *size))
    flops = None
    if row.startswith("torch"):
        from torch.utils.flop_counter import FlopCounterMode

        from pipeline.devices import cpu_has_bf16

        device = "cuda" if "cuda" in row else "cpu"
        module = load_torch(args.model).to(device)
        x = torch.from_numpy(image).to(device).contiguous(memory_format=torch.channels_last)
        module = module.to(memory_format=torch.channels_last)
        bf16 = row.endswith("bf16")
        if bf16 and device == "cpu" and not cpu_has_bf16():
            return {"row": row, "skipped": "this CPU has no native bf16"}

        def forward() -> None:
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                module(x)
            if device == "cuda":
                torch.cuda.synchronize()

        idle = peak_mib()
        if row in ("torch-fp32", "torch-cuda-fp32"):
            counter = FlopCounterMode(display=False)
            with counter:
                forward()  # the warm-up pass, counted
            flops = counter.get_total_flops()
        else:
            forward()
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.log_severity_level = 3
        providers = PROVIDERS.get(row, ["CPUExecutionProvider"])
        session = ort.InferenceSession(files[FILE_OF[row]], options, providers=providers)
        feed = {"image": np.ascontiguousarray(image)}

        def forward() -> None:
            session.run(["logits"], feed)

        idle = peak_mib()
        forward()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        forward()
        times.append(time.perf_counter() - start)
    seconds = min(times)  # the best pass: this VM's cores are shared, steal only adds time
    return {
        "row": row,
        "size": f"{size[0]}x{size[1]}",
        "images_per_s": round(1 / seconds, 4),
        "s_per_image": round(seconds, 3),
        "median_s": round(sorted(times)[len(times) // 2], 3),
        "peak_mib": round(peak_mib()),
        "above_idle_mib": round(peak_mib() - idle),
        "gflops": None if flops is None else round(flops / 1e9, 2),
        "threads": args.threads,
    }


def export_files(args: argparse.Namespace, rows: list[str], folder: Path) -> dict[str, str]:
    """The ONNX files the ``rows`` need (fused, standard, int8, int8-standard), exported once."""
    from pipeline.artifacts.onnxgraph import export_onnx, probe_image
    from pipeline.sections import ExportParams
    from pipeline.use.export import calibration_images, quantize_int8

    module = load_torch(args.model)
    needed = {FILE_OF[r] for r in rows if r in FILE_OF}
    files = {name: str(folder / f"{name}.onnx") for name in needed}
    for attention in ("fused", "standard"):
        if attention in needed or f"int8{'-standard' * (attention == 'standard')}" in needed:
            export_onnx(module, folder / f"{attention}.onnx", attention)
            files[attention] = str(folder / f"{attention}.onnx")
    if {"int8", "int8-standard"} & needed:
        if args.shards:
            params = ExportParams(
                calibration_shards=args.shards, calibration_images=args.calibration
            )
            images = calibration_images(params)
        else:
            images = [probe_image((1, 3, 360, 480), seed=i) for i in range(args.calibration)]
        for name, source in (("int8", "fused"), ("int8-standard", "standard")):
            if name in needed:
                quantize_int8(Path(files[source]), Path(files[name]), images, "minmax")
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="a model.pt (default: random DANet-R18d)")
    parser.add_argument("--shards", default="", help="shards to calibrate INT8 on (train split)")
    parser.add_argument("--calibration", type=int, default=16, help="calibration images")
    parser.add_argument("--sizes", default="360x480,1024x2048")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--peak-gflops", type=float, default=2 * 3.7 * 32, help="fp32 peak")
    parser.add_argument("--row", default="", help=argparse.SUPPRESS)  # a child: one row
    parser.add_argument("--files", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    if args.row:
        print(json.dumps(run_row(args.row, sizes[0], args, json.loads(args.files))))  # type: ignore[arg-type]
        return
    rows = [r for r in args.rows.split(",") if r]
    sgemm = sgemm_gflops(args.threads) if not any("cuda" in r or "trt" in r for r in rows) else None
    print(
        json.dumps(
            {"peak_gflops": args.peak_gflops, "sgemm_gflops": sgemm, "threads": args.threads}
        )
    )
    with tempfile.TemporaryDirectory(prefix="bench-export-") as folder:
        start = time.perf_counter()
        files = export_files(args, rows, Path(folder))
        print(json.dumps({"exported_s": round(time.perf_counter() - start, 1)}), flush=True)
        for size in args.sizes.split(","):
            results: dict[str, dict] = {}
            for row in rows:
                command = [sys.executable, __file__, *sys.argv[1:], "--row", row]
                command += ["--sizes", size, "--files", json.dumps(files)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    result = {"row": row, "size": size, "failed": done.stderr.strip()[-300:]}
                else:
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                results[row] = result
                print(json.dumps(result), flush=True)
            base = results.get("torch-fp32") or results.get("torch-cuda-fp32") or {}
            flops = base.get("gflops")
            summary: dict[str, Any] = {"size": size, "x_vs_torch_fp32": {}, "of_peak": {}}
            for row, r in results.items():
                if "images_per_s" not in r:
                    continue
                if "images_per_s" in base:
                    ratio = r["images_per_s"] / base["images_per_s"]
                    summary["x_vs_torch_fp32"][row] = round(ratio, 2)
                if flops:
                    achieved = flops * r["images_per_s"]
                    summary["of_peak"][row] = round(achieved / args.peak_gflops, 3)
            print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
