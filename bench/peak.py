"""The GPUs' dense bf16 peaks that MFU is counted against (bench/train_step.py and
bench/time_to_accuracy.py)."""

from __future__ import annotations

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # FLOP/s


def peak_bf16(device: torch.device | str) -> float | None:
    """The dense bf16 FLOP/s of ``device``'s GPU, or None (the CPU, a GPU not in the table)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)
