"""Where the host time of one call goes, function by function (cProfile), on a CUDA machine.

    MFA_BACKEND=triton PYTHONPATH=. python benchmarks/triton/host_profile.py

host_overhead.py gives the totals (µs per call, ours beside SDPA); this names the functions behind them, for
a tiny problem whose kernels finish in a few µs (the GPU idles, so the wall time is the host's): a forward
without grad, a training step (forward with grad + autograd.grad), and a model's decode layer (the plan).
"""

from __future__ import annotations

import cProfile
import pstats
import time

import torch

CALLS = 300


def _profile(name: str, fn) -> None:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / CALLS * 1e6
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(CALLS):
        fn()
    torch.cuda.synchronize()
    profiler.disable()
    print(f"\n== {name}: {wall:.1f} µs per call unprofiled; top functions by own time (µs per call):")
    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:18]
    for (path, line, func), (_, calls, own, cumulative, _) in rows:
        print(f"  {own / CALLS * 1e6:7.1f} own {cumulative / CALLS * 1e6:7.1f} cum  x{calls / CALLS:<4.0f} "
              f"{path.split('site-packages/')[-1][-48:]}:{line}({func})")


def main() -> None:
    import mfa_hf
    from mfa_hf.decode_plan import DecodePlan, LayerKV
    from mfa_hf.kernels.contract import CacheSide

    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    q, k, v = (torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)
    with torch.no_grad():
        _profile("flash_attn_func, no grad", lambda: mfa_hf.flash_attn_func(q, k, v, causal=True))
    _profile("training step (forward with grad + autograd.grad)",
             lambda: torch.autograd.grad(mfa_hf.flash_attn_func(*leaves, causal=True), leaves, grad))
    _profile("training step through backward() (grads accumulate)",
             lambda: mfa_hf.flash_attn_func(*leaves, causal=True).backward(grad))
    qd = torch.randn(8, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    caches = [torch.randn(8, 256, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    layer = LayerKV(CacheSide(caches[0], None, "none", 128), CacheSide(caches[1], None, "none", 128), 200)
    plan = DecodePlan(8, 1)
    with torch.no_grad():
        _profile("decode plan layer, plain cache", lambda: plan.run(qd, layer, scale=128 ** -0.5))


if __name__ == "__main__":
    main()
