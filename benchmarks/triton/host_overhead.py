"""Host-side cost per call of each layer of the forward and decode paths, on a CUDA machine.

    PYTHONPATH=. python benchmarks/triton/host_overhead.py

A tiny problem (the GPU finishes each kernel in a few µs) is called back to back N times and the wall
time divided by N: with the device idle most of the time, that is the host's cost of one call (the best of
five rounds: the lent machines' hosts were seen to differ by 2x between runs, and within a run). Layers,
outermost first: the public function (validation, dispatch, custom op, launcher), the custom op alone,
the backend's launcher, the bare Triton launch with the launcher's arguments, and SDPA for scale.
Then the two ways of launching a kept kernel (the C launcher, CompiledKernel[grid]'s runner), alternating in
one process. Then, at B x N = 16384 (H x D = 2048, bf16), the forward timed both ways: one synchronized call at a
time (host cost adds to device time, as for a lone call) and queued back to back (host cost hidden
while it is below the kernel's time, as inside a model).
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CALLS = 2000


REPEATS = 5


def host_us(fn, calls: int = CALLS, repeats: int = REPEATS) -> float:
    """µs per call: the best of `repeats` rounds of calls // repeats back-to-back calls (timeit's rule: the
    fastest round is the one least disturbed by the rest of the machine, whose noise only adds time)."""
    for _ in range(50):
        fn()
    rounds = []
    per_round = max(1, calls // repeats)
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(per_round):
            fn()
        torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) / per_round * 1e6)
    return min(rounds)


def forward_layers() -> None:
    import mfa_hf
    from mfa_hf.kernels.triton import forward as tf
    from mfa_hf.kernels.triton import forward_kernel as kernels

    q, k, v = (torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    from mfa_hf import dispatch
    from mfa_hf.kernels.contract import AttentionCall

    args = (q, k, v, None, None, None, None, None, None, 0.125, -1, 0, 0.0, 0.0, 0, 0)  # the op schema
    call = AttentionCall.from_op_args(args)
    ops = dispatch.backend("triton").ops
    captured = {}
    launch = kernels.attention_forward_kernel.run

    def capture(*a, **kw):  # the launcher's exact arguments, to replay the bare launch
        captured.update(a=a, kw=kw)
        return launch(*a, **kw)

    kernels.attention_forward_kernel.run = capture
    tf.forward(call)
    kernels.attention_forward_kernel.run = launch
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with torch.no_grad():
        rows = {
            "flash_attn_func (no grad)": host_us(lambda: mfa_hf.flash_attn_func(q, k, v, causal=True)),
            "ops.forward (eager shortcut: the op's implementation)": host_us(lambda: ops.forward(call)),
            "custom op mfa_hf::triton_attention_fwd (dispatcher)": host_us(lambda: ops.forward.op(*args)),
            "triton backend launcher (forward)": host_us(lambda: tf.forward(call)),
            "bare Triton launch (same arguments)": host_us(lambda: launch(*captured["a"], **captured["kw"])),
            "torch.empty x2 (the outputs)": host_us(
                lambda: (torch.empty_like(q), torch.empty(1, 2, 64, device="cuda"))),
        }
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            rows["SDPA flash"] = host_us(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
    grad_q, grad_k, grad_v = (t.clone().requires_grad_() for t in (q, k, v))
    rows["flash_attn_func (inputs require grad, forward only)"] = host_us(
        lambda: mfa_hf.flash_attn_func(grad_q, grad_k, grad_v, causal=True))
    # A training step's host cost: forward with grad, then autograd.grad (backward_profile.py saw the GPU idle
    # 0.3-1 ms per fwd+bwd step at 2k, beside kernels that summed below SDPA-flash's).
    leaves, grad = (grad_q, grad_k, grad_v), torch.randn_like(q)
    rows["flash_attn_func forward + autograd.grad (a training step)"] = host_us(
        lambda: torch.autograd.grad(mfa_hf.flash_attn_func(*leaves, causal=True), leaves, grad), 1000)
    heads_first = [t.detach().transpose(1, 2).requires_grad_() for t in leaves]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        rows["SDPA flash forward + autograd.grad"] = host_us(lambda: torch.autograd.grad(
            F.scaled_dot_product_attention(*heads_first, is_causal=True), heads_first, grad.transpose(1, 2)), 1000)
    print("host µs per call (B=1, N=64, H=2, D=64 bf16, causal; the GPU idles most of the time):")
    for name, us in rows.items():
        print(f"  {name:55s} {us:8.1f}")


def decode_layers() -> None:
    import mfa_hf

    q = torch.randn(8, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(8, 256, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.full((8,), 200, dtype=torch.int32, device="cuda")
    rows = {
        "flash_attn_with_kvcache, cache_seqlens tensor (read back)": host_us(
            lambda: mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths), 500),
        "flash_attn_with_kvcache, cache_seqlens int (host)": host_us(
            lambda: mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=200), 500),
    }
    from mfa_hf.decode_plan import DecodePlan, LayerKV
    from mfa_hf.kernels.contract import CacheSide
    from mfa_hf.kvcache import cache_side

    plain = LayerKV(CacheSide(k_cache, None, "none", 128), CacheSide(v_cache, None, "none", 128), 200)
    int8 = LayerKV(*(cache_side(mfa_hf.quantize_kv(c, "int8")) for c in (k_cache, v_cache)), 200)
    plan = DecodePlan(8, 1)
    qt, kt, vt = q.transpose(1, 2), k_cache[:, :200].transpose(1, 2), v_cache[:, :200].transpose(1, 2)
    with torch.no_grad():
        rows["decode plan layer (a model's decode step), plain cache"] = host_us(
            lambda: plan.run(q, plain, scale=128 ** -0.5), 2000)
        rows["decode plan layer, int8 cache (no residual)"] = host_us(lambda: plan.run(q, int8, scale=128 ** -0.5), 2000)
        rows["SDPA over the cache view (enable_gqa)"] = host_us(
            lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True), 2000)
    print("host µs per decode call (B=8, Hq=32, Hkv=8, D=128, 256-token cache, 200 valid):")
    for name, us in rows.items():
        print(f"  {name:55s} {us:8.1f}")


def two_timings() -> None:
    import mfa_hf

    print("forward TFLOP/s, B x N = 16384, H x D = 2048, bf16: one synchronized call at a time / queued back to back")
    for dim in (128, 64):
        for causal in (False, True):
            for n in (512, 1024, 2048, 8192):
                b, h = 16384 // n, 2048 // dim
                q, k, v = (torch.randn(b, n, h, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
                flops = 4 * b * h * n * n * dim / (2 if causal else 1)
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    flash = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)  # noqa: E731
                    ours = lambda: mfa_hf.flash_attn_func(q, k, v, causal=causal)  # noqa: E731
                    cells = []
                    for fn in (ours, flash):
                        cells += [flops / _synced_ms(fn) / 1e9, flops / _queued_ms(fn) / 1e9]
                print(f"  D={dim} causal={causal!s:5} N={n:5}: ours {cells[0]:6.1f} / {cells[1]:6.1f}   "
                      f"SDPA-flash {cells[2]:6.1f} / {cells[3]:6.1f}   ours/flash {cells[0] / cells[2]:.2f} / "
                      f"{cells[1] / cells[3]:.2f}", flush=True)


def _synced_ms(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _queued_ms(fn, calls: int = 30) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def launch_ways(rounds: int = 5) -> None:
    """The C launcher (direct_launch._Fire) against CompiledKernel[grid]'s runner, alternating in one process:
    the lent hosts differ by up to 2x between machines, so only a same-process comparison tells the change."""
    import mfa_hf
    from mfa_hf.decode_plan import DecodePlan, LayerKV
    from mfa_hf.kernels.contract import CacheSide
    from mfa_hf.kernels.triton.direct_launch import through_runner

    q, k, v = (torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)
    dq = torch.randn(8, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(8, 256, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    layer = LayerKV(CacheSide(k_cache, None, "none", 128), CacheSide(v_cache, None, "none", 128), 200)
    plan = DecodePlan(8, 1)
    cases = {
        "flash_attn_func (no grad)": (lambda: mfa_hf.flash_attn_func(q, k, v, causal=True), 2000),
        "decode plan layer, plain cache": (lambda: plan.run(dq, layer, scale=128 ** -0.5), 2000),
        "training step (4 launches)": (
            lambda: torch.autograd.grad(mfa_hf.flash_attn_func(*leaves, causal=True), leaves, grad), 600),
    }
    best: dict = {}
    for _ in range(rounds):
        for name, (fn, calls) in cases.items():
            for way in ("runner", "C launcher"):
                with torch.no_grad() if "training" not in name else contextlib.nullcontext():
                    if way == "runner":
                        with through_runner():
                            us = host_us(fn, calls, 1)
                    else:
                        us = host_us(fn, calls, 1)
                best[name, way] = min(us, best.get((name, way), us))
    print(f"host µs per call, launch ways alternating ({rounds} rounds, best of each):")
    for name in cases:
        runner, direct = best[name, "runner"], best[name, "C launcher"]
        print(f"  {name:40s} runner {runner:7.1f}   C launcher {direct:7.1f}   saved {runner - direct:5.1f}")


def main() -> None:
    import triton

    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    forward_layers()
    decode_layers()
    launch_ways()
    two_timings()


if __name__ == "__main__":
    main()
