"""GPU check of the native route and the decode plan's host cost and CUDA-graph capture (issue 19).

    PYTHONPATH=. python benchmarks/triton/native_route_check.py [--profile]

1. Semantics on cuda: each class the router sends to SDPA (square causal, GQA, Lq != Lk without causal,
   one row under a left window) against the float64 reference with DESIGN.md's rule, forward and
   gradients; and what cuda SDPA does with a NaN in a query row (whether the gate must put it back).
   1b. One decode row at key lengths seen for the first time: SDPA's own choice against the routed call (held to
   the flash kernel: cuDNN builds a graph per key length), and the kernel each ran.
2. A decode step captured in a CUDA graph: DecodePlan.run on a plain bf16 layer (native route) and on an
   int8 MFAQuantizedCache-like layer (triton decode op), replayed and compared with eager.
3. Host µs per call, the GPU idle: flash_attn_func routed (auto) and forced triton, a decode layer through
   the plan (native, triton plain, triton int8) and through the transformers attention function, SDPA.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys

import torch
from host_overhead import host_us  # benchmarks/triton/, on sys.path when this file runs as a script

import mfa_hf
from mfa_hf import trace
from mfa_hf.decode_plan import DecodePlan, LayerKV
from mfa_hf.kernels.contract import CacheSide
from mfa_hf.kernels.reference import attention_reference
from mfa_hf.kvcache import cache_side
from mfa_hf.testing import GRADIENT_FACTOR, assert_close_to_reference

DEV, BF16 = "cuda", torch.bfloat16


def semantics() -> None:
    g = torch.Generator().manual_seed(0)
    cases = {"causal-square": (64, 64, 8, 2, (-1, 0)), "full-lq<lk": (40, 96, 8, 8, (-1, -1)),
             "gqa-causal": (128, 128, 8, 2, (-1, 0)), "one-row-window": (1, 300, 8, 2, (31, 0)),
             "one-row": (1, 300, 8, 1, (-1, 0))}
    for name, (lq, lk, hq, hkv, window) in cases.items():
        q = torch.randn(2, lq, hq, 64, generator=g).to(DEV, BF16).requires_grad_()
        k, v = (torch.randn(2, lk, hkv, 64, generator=g).to(DEV, BF16).requires_grad_() for _ in range(2))
        with trace.capture_routes() as decided:
            out = mfa_hf.flash_attn_func(q, k, v, window_size=window)
        grad = torch.randn(out.shape, generator=g).to(DEV, BF16)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        leaves64 = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
        leaves = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
        ref, _ = attention_reference(*leaves64, window_size=window)
        base, _ = attention_reference(*leaves, window_size=window, upcast=False)
        want = torch.autograd.grad(ref, leaves64, grad.cpu().double())
        have = torch.autograd.grad(base, leaves, grad.cpu())
        verdict = "ok"
        try:
            assert_close_to_reference(out.cpu(), ref, base)
            for n, a, r, b in zip("qkv", grads, want, have):
                assert_close_to_reference(a.cpu(), r, b, GRADIENT_FACTOR, f"d{n}", BF16)
        except AssertionError as error:
            verdict = f"FAIL {error}"
        print(f"  {name:16s} route {list(decided)} -> {verdict}", flush=True)
    q, k, v = (torch.randn(1, 5, 2, 64, device=DEV, dtype=BF16) for _ in range(3))
    q[0, 2, 1, 0] = float("nan")
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    print(f"  cuda SDPA, NaN in query row: that row -> {'NaN' if out[0, 1, 2].isnan().all() else out[0, 1, 2, :3]}; "
          f"routed: {'NaN' if mfa_hf.flash_attn_func(q, k, v)[0, 2, 1].isnan().all() else 'not NaN'}", flush=True)


def new_lengths(steps: int = 16) -> None:
    """One decode row at key lengths seen for the first time, as every generated token's step is: SDPA's own
    choice (torch 2.11 picks cuDNN, which builds a graph per shape) against the routed call (the gate holds
    decode rows to the flash kernel), ms per call synchronized, and the kernel each ran. K/V are contiguous
    heads-first tensors, as transformers' DynamicCache hands them over."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 32, 1, 64, generator=g).to(DEV, BF16)
    variants = {
        "SDPA's choice": lambda k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "routed (flash_attn_func)": lambda k, v: mfa_hf.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True),
    }
    for index, (name, call) in enumerate(variants.items()):
        first = 8192 + index * 2 * steps  # lengths no variant has run
        caches = [[torch.randn(1, 8, length, 64, generator=g).to(DEV, BF16) for _ in range(2)]
                  for length in range(first, first + steps + 1)]
        events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for k, v in caches[:-1]:
            torch.cuda.synchronize()
            events[0].record()
            call(k, v)
            events[1].record()
            torch.cuda.synchronize()
            times.append(events[0].elapsed_time(events[1]))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call(*caches[-1])
            torch.cuda.synchronize()
        kernels = sorted({e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product_")})
        print(f"  {name:26s} new lengths: first {times[0]:.2f} ms, median {sorted(times)[steps // 2]:.3f} ms; "
              f"ran {kernels}", flush=True)
    # What the flash kernel itself gives a NaN query row (the held gate restores such rows until this says NaN).
    k, v = caches[0]
    bad = q.clone()
    bad[0, 3, 0, 5] = float("nan")
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        raw = torch.nn.functional.scaled_dot_product_attention(bad, k, v, enable_gqa=True)
    routed = mfa_hf.flash_attn_func(bad.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    print(f"  flash kernel, one-row decode, NaN in a query row: that row -> "
          f"{'NaN' if raw[0, 3, 0].isnan().all() else raw[0, 3, 0, :3].tolist()}; routed: "
          f"{'NaN' if routed[0, 0, 3].isnan().all() else routed[0, 0, 3, :3].tolist()}", flush=True)


def _layers(batch=8, length=4096, hq=32, hkv=8, dim=128):
    q = torch.randn(batch, 1, hq, dim, device=DEV, dtype=BF16)
    k, v = (torch.randn(batch, length, hkv, dim, device=DEV, dtype=BF16) for _ in range(2))
    plain = LayerKV(CacheSide(k, None, "none", dim), CacheSide(v, None, "none", dim), length)
    kq, vq = mfa_hf.quantize_kv(k, "int8"), mfa_hf.quantize_kv(v, "int8")
    return q, plain, LayerKV(cache_side(kq), cache_side(vq), length)


def cuda_graph() -> None:
    q, plain, int8 = _layers()
    for name, layer in (("plain bf16 (native)", plain), ("int8 (triton decode)", int8)):
        plan = DecodePlan(q.shape[0], 1)
        eager = plan.run(q, layer, scale=0.088)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            plan.run(q, layer, scale=0.088)  # warm on the side stream, as torch.cuda.graphs asks
        torch.cuda.current_stream().wait_stream(stream)
        try:
            with torch.cuda.graph(graph):
                captured = plan.run(q, layer, scale=0.088)
            q.copy_(torch.randn_like(q))
            graph.replay()
            torch.cuda.synchronize()
            fresh = plan.run(q, layer, scale=0.088)
            diff = (captured.float() - fresh.float()).abs().max().item()
            print(f"  CUDA graph, decode step {name}: captured and replayed; max |replay - eager| = {diff:.2e} "
                  f"(eager before: {eager.shape})", flush=True)
        except Exception as error:  # report, do not hide: the capture is an acceptance point
            print(f"  CUDA graph, decode step {name}: FAILED {type(error).__name__}: {error}", flush=True)


def host_cost() -> None:
    from mfa_hf.integrations.transformers import decode

    q, k, v = (torch.randn(1, 64, 2, 64, device=DEV, dtype=BF16) for _ in range(3))
    dq, plain, int8 = _layers(batch=1, length=256, hq=8, hkv=2, dim=64)
    kt, vt = plain.keys.codes.transpose(1, 2), plain.values.codes.transpose(1, 2)
    qt = dq.transpose(1, 2)
    rows = {}
    with torch.no_grad():
        for backend in ("auto", "triton"):
            os.environ["MFA_BACKEND"] = backend
            rows[f"flash_attn_func causal N=64 [{backend}]"] = host_us(
                lambda: mfa_hf.flash_attn_func(q, k, v, causal=True))
            plan = DecodePlan(1, 1)
            rows[f"decode layer: DecodePlan.run plain bf16 [{backend}]"] = host_us(
                lambda: plan.run(dq, plain, scale=0.125))
            rows[f"decode layer: transformers plain_decode [{backend}]"] = host_us(
                lambda: decode.plain_decode(qt, kt, vt, scaling=0.125))
        os.environ["MFA_BACKEND"] = "auto"
        plan = DecodePlan(1, 1)
        rows["decode layer: DecodePlan.run int8 [auto -> triton]"] = host_us(lambda: plan.run(dq, int8, scale=0.125))
        rows["SDPA (is_causal, N=64)"] = host_us(lambda: torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True))
        rows["SDPA decode (1 row, GQA)"] = host_us(lambda: torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, enable_gqa=True))
    print("host µs per call (GPU idle; B=1, bf16):")
    for name, us in rows.items():
        print(f"  {name:58s} {us:8.1f}", flush=True)
    if "--profile" in sys.argv:  # where the host time goes, per path (cProfile's own time, top functions)
        with torch.no_grad():
            for backend, name, fn in (
                    ("auto", "flash_attn_func", lambda: mfa_hf.flash_attn_func(q, k, v, causal=True)),
                    ("triton", "flash_attn_func", lambda: mfa_hf.flash_attn_func(q, k, v, causal=True)),
                    ("auto", "DecodePlan.run plain", lambda: plan.run(dq, plain, scale=0.125)),
                    ("auto", "DecodePlan.run int8", lambda: plan.run(dq, int8, scale=0.125))):
                os.environ["MFA_BACKEND"] = backend
                profile_calls(f"{name} [{backend}]", fn)
        os.environ["MFA_BACKEND"] = "auto"


def profile_calls(name: str, fn, calls: int = 2000) -> None:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(14)
    print(f"--- cProfile {name}, {calls} calls ---")
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:4000], flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    print("1. native route semantics on cuda:")
    semantics()
    print("1b. decode rows at new key lengths:")
    new_lengths()
    print("2. CUDA graph capture of a decode step:")
    cuda_graph()
    print("3. host cost:")
    host_cost()
