"""Dense vs memory-efficient position attention: time and peak memory, forward and forward+backward.

    python bench/attention.py                         # CPU: 64x64, 96x96, 128x128 maps
    python bench/attention.py --device cuda --sizes 64x64 128x128 128x256 --dtypes fp32 bf16

C = 512 channels (key 64), batch 2, gamma = 0.5; ``bf16`` runs under bf16 autocast, as training
does (the attention energies stay fp32 inside the module). On CPU every measurement runs in a fresh
subprocess and peak memory is the growth of its peak RSS over the run (inputs already allocated);
on CUDA it is ``torch.cuda.max_memory_allocated`` above the inputs. Time is the median of the timed
repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from danet.attention import PositionAttention


def measure(
    impl: str, height: int, width: int, backward: bool, device: str, repeats: int, dtype: str
) -> dict:
    """One configuration in this process: peak memory of the first call, then median time."""
    torch.manual_seed(0)
    pam = PositionAttention(512, impl=impl).to(device)  # type: ignore[arg-type]
    with torch.no_grad():
        pam.gamma.fill_(0.5)
    x = torch.randn(2, 512, height, width, device=device, requires_grad=backward)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            if backward:
                pam(x).float().sum().backward()
            else:
                with torch.no_grad():
                    pam(x)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"peak_mib": peak / 2**20, "time_s": statistics.median(times)}


def run_isolated(
    impl: str, h: int, w: int, backward: bool, device: str, repeats: int, dtype: str
) -> dict:
    spec = f"{impl},{h},{w},{int(backward)},{device},{repeats},{dtype}"
    cmd = [sys.executable, __file__, "--one", spec]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", nargs="+", default=["64x64", "96x96", "128x128"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        impl, h, w, bwd, device, repeats, dtype = args.one.split(",")
        print(
            json.dumps(measure(impl, int(h), int(w), bool(int(bwd)), device, int(repeats), dtype))
        )
        return

    print(
        f"PAM C=512 key=64 batch=2 on {args.device} ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}"
    )
    header = f"{'map':>9} {'dtype':>5} {'pass':>8} | {'dense s':>8} {'eff s':>8} {'t ratio':>7} | "
    header += f"{'dense MiB':>9} {'eff MiB':>8} {'mem ratio':>9}"
    print(header)
    print("-" * len(header))
    for size, dtype, backward in itertools.product(args.sizes, args.dtypes, (False, True)):
        h, w = (int(v) for v in size.split("x"))
        r = {
            impl: run_isolated(impl, h, w, backward, args.device, args.repeats, dtype)
            for impl in ("dense", "efficient")
        }
        d, e = r["dense"], r["efficient"]
        print(
            f"{size:>9} {dtype:>5} {'fwd+bwd' if backward else 'fwd':>8} | {d['time_s']:8.3f} "
            f"{e['time_s']:8.3f} {e['time_s'] / d['time_s']:7.2f} | {d['peak_mib']:9.0f} "
            f"{e['peak_mib']:8.0f} {d['peak_mib'] / max(e['peak_mib'], 1e-9):9.1f}",
            flush=True,
        )
    print("t ratio = efficient / dense time; mem ratio = dense / efficient peak memory")


if __name__ == "__main__":
    main()
