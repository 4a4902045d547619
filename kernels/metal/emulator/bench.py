"""Emulator speed on the flash-attention-sized reference workload.

    MSLEMU_WORKERS=1 taskset -c 0 python -m mfa_hf.kernels.metal.emulator.bench

Prints the compile time (first, uncached, and cached) and the best of several launches of
examples/flash_attention_mma.metal (8x8 MMAs) at B=1, H=2, N=256, D=64, with its max error.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from .library import compile_shader, default_workers

EXAMPLE = Path(__file__).resolve().parent / "examples" / "flash_attention_mma.metal"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--schedule", default="forward")
    a = p.parse_args()
    start = time.perf_counter()
    lib = compile_shader(EXAMPLE.read_text())
    compile_s = time.perf_counter() - start
    b, h, n, d = a.batch, a.heads, a.seq, 64
    q, k, v = (torch.randn(b, h, n, d).half() for _ in range(3))
    out = torch.empty_like(q)
    launch = dict(threads=(128 * math.ceil(n / 32), b * h), group_size=(128, 1), arg_casts={4: "int32"}, schedule=a.schedule)
    times = []
    for _ in range(a.repeats):
        start = time.perf_counter()
        lib.flash_attention_mma(q, k, v, out, n, 1 / math.sqrt(d), **launch)
        times.append(time.perf_counter() - start)
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(d), -1) @ v.double()
    print(f"flash_attention_mma B={b} H={h} N={n} D={d}  workers={default_workers()}  schedule={a.schedule}")
    print(f"compile (incl. cache lookup): {compile_s * 1e3:.0f} ms")
    print(f"run: best {min(times) * 1e3:.1f} ms, median {sorted(times)[len(times) // 2] * 1e3:.1f} ms "
          f"over {a.repeats} launches")
    print(f"max abs error vs float64: {(out.double() - ref).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
