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


def autocast(device: torch.device, bf16: bool) -> Any:
    """bf16 autocast when asked, on CUDA and on CPUs with native bf16 (``cpu_has_bf16``);
    attention energies stay fp32 inside (danet/attention.py), a loss is taken outside."""
    if bf16 and (device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
