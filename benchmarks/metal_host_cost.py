"""Host cost per call of the Metal forward and decode launchers, with the kernel stubbed.

The compile step returns a library whose kernels do nothing, so what is timed is the Python launch
path alone (the loader's launch checks included): output allocation, shapes/strides, the parameter list, the variant
and library lookups, the launch call. CPU tensors (the emulator's launch path); no Metal device and
no claim about Apple hardware. Prints µs per call (median of several repeats; CPU and wall time).

    PYTHONPATH=. python benchmarks/metal_host_cost.py [--calls 2000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mfa_hf.kernels.contract import AttentionCall, CacheSide, DecodeCall, Options
from mfa_hf.kernels.metal import decode as decode_mod, forward as forward_mod, loader


class _NoOpKernel:
    max_threads_per_threadgroup = 1024

    def __call__(self, *args, threads, group_size):
        return None


class _NoOpLibrary:
    def __getattr__(self, name):
        return _NoOpKernel()


def stub_kernels() -> None:
    """Compiles return a library of no-op kernels; the loader still wraps it (CheckedLibrary,
    CheckedKernel's launch checks), so only the kernel dispatch itself is missing."""
    loader.runtime_compile_shader = lambda device: lambda source: _NoOpLibrary()


def per_call_us(fns: dict, calls: int, repeats: int) -> dict:
    """{name: "cpu / wall" µs per call}: medians over repeats, the functions timed in turn within each
    repeat (a shared machine's slow phases then hit all of them alike). CPU time is this thread's
    (what the launch path costs); wall time also counts time spent descheduled."""
    for fn in fns.values():
        for _ in range(200):
            fn()
    cpu = {name: [] for name in fns}
    wall = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start_cpu, start_wall = time.thread_time(), time.perf_counter()
            for _ in range(calls):
                fn()
            cpu[name].append((time.thread_time() - start_cpu) / calls * 1e6)
            wall[name].append((time.perf_counter() - start_wall) / calls * 1e6)
    return {name: f"{statistics.median(cpu[name]):6.1f} cpu {statistics.median(wall[name]):6.1f} wall" for name in fns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    stub_kernels()
    torch.manual_seed(0)
    b, h, hkv, d = 2, 8, 2, 128
    q = torch.randn(b, 256, h, d, dtype=torch.float16)
    k = torch.randn(b, 256, hkv, d, dtype=torch.float16)
    v = torch.randn(b, 256, hkv, d, dtype=torch.float16)
    fwd = AttentionCall(q, k, v, Options(scale=d ** -0.5, window_right=0))
    cache_k = torch.randn(b, 1024, hkv, d, dtype=torch.float16)
    cache_v = torch.randn(b, 1024, hkv, d, dtype=torch.float16)
    dec = DecodeCall(torch.randn(b, 1, h, d, dtype=torch.float16), CacheSide(cache_k, None, "none", 0),
                     CacheSide(cache_v, None, "none", 0), torch.full((b,), 700, dtype=torch.int32),
                     Options(scale=d ** -0.5, window_right=0))
    results = per_call_us({
        f"forward  (B={b}, L=256, Hq={h}, Hkv={hkv}, D={d}, causal, fp16)": lambda: forward_mod.forward(fwd),
        f"decode   (B={b}, Lq=1, Hq={h}, Hkv={hkv}, D={d}, cache 1024, fp16)": lambda: decode_mod.decode(dec),
        "torch.empty x2 alone (the forward's out and lse)": lambda: (
            torch.empty((b, 256, h, d), dtype=torch.float16), torch.empty((b, h, 256), dtype=torch.float32)),
    }, args.calls, args.repeats)
    print(f"torch {torch.__version__}, {args.calls} calls x {args.repeats} repeats, median µs per call "
          "(kernel stubbed, CPU tensors)")
    for name, value in results.items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
