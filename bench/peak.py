"""The peaks MFU is counted against (pipeline/training/flops.py ``device_peak``), per precision:
a GPU's from NVIDIA's data sheets, this CPU's measured (the best rate of one thread's matmuls
times this process's threads, under a second per dtype) and cached in ~/.cache/danet/peak.json.

    python bench/peak.py                 # this machine's CPU (measured once, then read back)
    python bench/peak.py --device cuda   # the GPU's table entry
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

from pipeline.devices import PRECISIONS
from pipeline.training.flops import cpu_dtype, device_peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}, {torch.get_num_threads()} threads")
    for precision in PRECISIONS:
        peak = device_peak(args.device, precision)
        dtype = f" ({cpu_dtype(precision)})" if args.device == "cpu" else ""
        shown = f"{peak / 1e12:.3f} TFLOP/s" if peak else "unknown"
        print(f"{precision:>5}{dtype}: {shown}")


if __name__ == "__main__":
    main()
