"""Model FLOPs utilization (MFU): the share of the device's peak that training turns into model
FLOPs.

The FLOPs of one step are counted once, at the start of a run, with torch's flop counter
(``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions and attention, forward and
backward) on one micro-batch of the run's size, through a copy of the model in eval mode: the run
is untouched (BatchNorm neither updates its statistics nor synchronises across ranks, dropout
draws nothing, and the RNGs are forked). Element-wise work (BatchNorm, ReLU, the loss) is not
counted, as in the field's MFU (PaLM, Appendix B): it is model FLOPs, not hardware FLOPs.

MFU = images/s x FLOPs per image / (peak x devices). The peak is the device's dense throughput in
the step's precision: NVIDIA's data-sheet figures for GPUs (bf16/fp16 tensor cores; TF32 for
fp32, in which cuDNN runs convolutions by default), and for a CPU the best rate matmuls reach in
that dtype on one of this process's threads, times its threads (``measure_matmul``),
measured once (under a second) and cached in ``~/.cache/danet/peak.json`` per CPU model, thread
count and torch version.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.devices import autocast, cpu_has_bf16

# (device name contains, {precision: dense FLOP/s}); the first match wins, so the longer names
# come first ("H100 PCIe" before "H100"). fp32 is TF32 where the GPU has it.
GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12}),
    ("B200", {"bf16": 2250e12, "fp16": 2250e12, "fp32": 1100e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
)
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "danet" / "peak.json"


def gpu_peak(name: str, precision: str) -> float | None:
    """The dense FLOP/s of the GPU named ``name`` in ``precision``; None when not in the table."""
    for key, peaks in GPU_PEAKS:
        if key in name:
            return peaks.get(precision)
    return None


def cpu_dtype(precision: str) -> torch.dtype:
    """The dtype a CPU step's matmuls run in: bf16 only where autocast uses it (native bf16)."""
    if precision == "bf16" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float16 if precision == "fp16" else torch.float32


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return str(torch.cpu.get_capabilities().get("cpu_name", "cpu"))


def measure_matmul(
    dtype: torch.dtype, sizes: tuple[int, ...] = (256, 512, 1024), seconds: float = 0.1
) -> float:
    """This process's peak in ``dtype``: the best rate of one thread's square matmuls of
    ``sizes`` (about ``seconds`` each), times its threads. Short single-thread calls are what a
    shared machine disturbs least: one call that ran undisturbed gives the core's rate, where a
    multi-threaded call waits for its slowest thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = 0.0
    try:
        for size in sizes:
            g = torch.Generator().manual_seed(0)
            a, b = (torch.randn(size, size, generator=g).to(dtype) for _ in range(2))
            torch.mm(a, b)  # warm-up: the kernel's first call
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                start = time.perf_counter()
                torch.mm(a, b)
                best = max(best, 2 * size**3 / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    return best * threads


def cpu_peak(dtype: torch.dtype, cache: Path | None = None) -> float:
    """This CPU's measured matmul peak in ``dtype`` on this process's threads, cached."""
    cache = cache or CACHE
    key = f"{_cpu_name()}|{torch.get_num_threads()} threads|torch {torch.__version__}|{dtype}"
    try:
        known: dict[str, float] = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = measure_matmul(dtype)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
            tmp.replace(cache)
        except OSError:  # a read-only home: measured again next time
            pass
    return float(known[key])


def device_peak(device: torch.device | str, precision: str) -> float | None:
    """The dense FLOP/s that ``device`` reaches in ``precision`` (see the module's docstring);
    None for a GPU the table does not know."""
    device = torch.device(device)
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device), precision)
    if device.type == "cpu":
        return cpu_peak(cpu_dtype(precision))
    return None


def _attention_formulas() -> dict[object, object]:
    """Formulas torch's counter lacks: the CPU kernels of scaled_dot_product_attention (the
    efficient position attention on a CPU), counted as their CUDA counterparts are."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    pairs = (
        ("_scaled_dot_product_flash_attention_for_cpu", "sdpa_flop"),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", "sdpa_backward_flop"),
    )
    found: dict[object, object] = {}
    for op, name in pairs:
        if hasattr(aten, op) and hasattr(flop_counter, name):
            formula = getattr(flop_counter, name)  # registered: already taking shapes

            def raw(*args: object, _formula: Any = formula, **kwargs: object) -> int:
                return int(_formula(*args, **kwargs))

            raw._get_raw = True  # type: ignore[attr-defined]  # the counter wraps it no further
            found[getattr(aten, op)] = raw
    return found


def step_flops(
    model: nn.Module,
    images: int,
    crop: int,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
) -> float:
    """FLOPs of one training micro-batch of ``images`` crops (forward and backward) of
    ``model`` (the plain module, not DDP or compiled), counted on a copy in eval mode."""
    from torch.utils.flop_counter import FlopCounterMode

    twin = copy.deepcopy(model).eval()
    x = torch.zeros(images, 3, crop, crop, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    cuda = [device.index or 0] if device.type == "cuda" else []
    counter = FlopCounterMode(display=False, custom_mapping=_attention_formulas())
    with torch.random.fork_rng(devices=cuda), counter:
        with autocast(device, precision):
            logits = twin(x)
        sum(v.float().mean() for v in logits.values()).backward()
    del twin
    return float(counter.get_total_flops())


@dataclass(frozen=True)
class Utilization:
    """A run's FLOPs per image and the peak of each of its ``devices``: images/s -> MFU."""

    flops_per_image: float
    peak: float | None  # FLOP/s of one device; None: not known (MFU is not reported)
    devices: int = 1

    def mfu(self, images_per_s: float) -> float | None:
        if not self.peak:
            return None
        return images_per_s * self.flops_per_image / (self.peak * self.devices)


def utilization(
    model: nn.Module,
    images: int,
    crop: int,
    device: torch.device,
    precision: str,
    channels_last: bool = False,
    devices: int = 1,
) -> Utilization:
    """Count one micro-batch's FLOPs and look up (or measure) the device's peak."""
    flops = step_flops(model, images, crop, device, precision, channels_last)
    return Utilization(flops / images, device_peak(device, precision), devices)
