"""Context parallelism on CPU/gloo: time per call vs tokens per rank, and the cost of staging through CPU memory.

Each row: `ranks` gloo processes (one thread each) run ring_flash_attn_func / ulysses_flash_attn_func on n
tokens each (N = ranks * n in all); the single-process row runs flash_attn_func on the whole N with as
many threads as there are ranks. `staged` sets MFA_CP_STAGE=1: every transfer copies to a separate CPU
buffer and back, which is what mps tensors cost on a Mac (gloo reads CPU tensors only); on a CPU-only
machine it measures the copies, not a Mac's unified-memory sync. Times are medians of `--repeat` calls
after one warm-up, measured on rank 0 between barriers.

    PYTHONPATH=. python benchmarks/distributed/cp_scaling.py --ranks 2 --tokens 512 1024 2048 4096
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist

import mfa_hf
from mfa_hf.distributed import ring_flash_attn_func, ulysses_flash_attn_func
from mfa_hf.distributed.testing import Pool, raise_failures

HEADS, DIM = 8, 64


def _timed(step, repeat: int, group) -> float:
    step()
    times = []
    for _ in range(repeat):
        dist.barrier(group)
        start = time.perf_counter()
        step()
        dist.barrier(group)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(context, payload):
    """Worker task: median seconds of one call (forward, or forward + backward) on this rank's n tokens."""
    method, tokens, causal, backward, staged, repeat = payload
    os.environ["MFA_CP_STAGE"] = "1" if staged else "0"
    g = torch.Generator().manual_seed(context.rank)
    q, k, v = (torch.randn(1, tokens, HEADS, DIM, generator=g).requires_grad_(backward) for _ in range(3))
    function = ring_flash_attn_func if method == "ring" else ulysses_flash_attn_func

    def step():
        out = function(q, k, v, causal=causal)
        if backward:
            out.sum().backward()

    return _timed(step, repeat, None)


def single_process(total: int, causal: bool, backward: bool, repeat: int, threads: int) -> float:
    torch.set_num_threads(threads)
    q, k, v = (torch.randn(1, total, HEADS, DIM).requires_grad_(backward) for _ in range(3))

    def step():
        out = mfa_hf.flash_attn_func(q, k, v, causal=causal)
        if backward:
            out.sum().backward()

    step()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="tokens per rank")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()} {os.cpu_count()} cores, "
          f"torch {torch.__version__}, mfa_hf {getattr(mfa_hf, '__version__', '?')}, gloo, {args.ranks} ranks x 1 "
          f"thread; H={HEADS} D={DIM} float32 B=1; load average {os.getloadavg()[0]:.2f} at start")
    print("method   causal  pass     n/rank  N      single_ms  cp_ms   staged_ms  staging_cost")
    pool = Pool(args.ranks)
    try:
        for causal, backward in ((False, False), (True, False), (True, True)):
            for method in ("ring", "ulysses"):
                for n in args.tokens:
                    row = (method, n, causal, backward)
                    plain = raise_failures(pool.run(measure, (*row, False, args.repeat)))[0]
                    staged = raise_failures(pool.run(measure, (*row, True, args.repeat)))[0]
                    single = single_process(n * args.ranks, causal, backward, args.repeat, args.ranks)
                    torch.set_num_threads(1)
                    print(f"{method:8} {str(causal):7} {'fwd+bwd' if backward else 'fwd':8} {n:<7} "
                          f"{n * args.ranks:<6} {single * 1e3:9.1f}  {plain * 1e3:6.1f}  {staged * 1e3:9.1f}  "
                          f"{(staged - plain) / plain:+.1%}", flush=True)
    finally:
        pool.close()


if __name__ == "__main__":
    main()
