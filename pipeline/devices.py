"""Where a model runs and in which precision: one device choice and one autocast policy for
training, evaluation, prediction and serving."""

from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Any

import torch

from pipeline.errors import ConfigError


def pick_device(name: str = "auto", param: str = "device") -> torch.device:
    """``auto`` = CUDA when present, else the CPU; ``cuda`` without a GPU is an error naming
    ``param``, not a silent CPU run."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{param} is cuda but no CUDA device is available")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16). oneDNN's bf16
    convolutions then beat fp32 (1.5x for a DANet-R18d step on 2 EPYC cores, BENCHMARKS.md);
    elsewhere bf16 is emulated and slower than fp32, so autocast stays off."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


PRECISIONS = ("fp32", "bf16", "fp16")


def autocast(device: torch.device, precision: str) -> Any:
    """Autocast in ``precision``: ``bf16`` on CUDA and on CPUs with native bf16
    (``cpu_has_bf16``; elsewhere fp32, which is faster there), ``fp16`` wherever torch has it
    (training pairs it with a gradient scaler), ``fp32`` none. Attention energies stay fp32
    inside (danet/attention.py); a loss is taken outside."""
    if precision == "bf16" and (device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        check_fp16(device.type)
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return nullcontext()


@functools.cache  # once per device type: autocast is entered at every forward pass
def check_fp16(device_type: str, param: str = "train.precision") -> None:
    """fp16 autocast and loss scaling on ``device_type``, or one line naming ``param``."""
    try:
        with torch.autocast(device_type=device_type, dtype=torch.float16):
            pass
        torch.amp.GradScaler(device_type)
    except (RuntimeError, ValueError, AssertionError) as err:
        raise ConfigError(
            f"{param} fp16: torch {torch.__version__} has no fp16 autocast or gradient scaler "
            f"on {device_type} ({str(err).splitlines()[0]}): use bf16 or fp32"
        ) from None
