"""GPU check of the call-object contract and the decode plan on the triton backend (issue 18).

For a few shapes: the triton decode of a two-part cache (quantized prefix + full-precision residual,
sinks, GQA, window, left-padded row groups through DecodePlan) against the torch backend on the same
call, and the host time per layer of DecodePlan.run against flash_attn_with_kvcache (the per-layer
validate + dispatch path it replaces). Run from the repository root:

    PYTHONPATH=. python benchmarks/triton/decode_plan_check.py
"""

from __future__ import annotations

import os
import time

import torch

import mfa_hf
from mfa_hf import dispatch
from mfa_hf.decode_plan import DecodePlan, LayerKV, group_rows
from mfa_hf.kernels.contract import CacheSide, DecodeCall, Options
from mfa_hf.kvcache import cache_side


def _two_part(fmt, batch=4, hq=32, hkv=8, d=128, capacity=4096, prefix=3000, r=7, lq=1, window=(-1, 0),
              sinks=True, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    k, v = (torch.randn(batch, capacity, hkv, d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    keys, values = (k, v) if fmt is None else (mfa_hf.quantize_kv(k, fmt), mfa_hf.quantize_kv(v, fmt))
    k_res, v_res = (torch.randn(batch, r, hkv, d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    q = torch.randn(batch, lq, hq, d, device="cuda", dtype=dtype, generator=g)
    return DecodeCall(q, cache_side(keys), cache_side(values),
                      torch.full((batch,), prefix, dtype=torch.int32, device="cuda"), Options(d ** -0.5, *window),
                      sinks=torch.randn(hq, device="cuda", generator=g) if sinks else None, residual_keys=k_res,
                      residual_values=v_res, residual_lengths=torch.full((batch,), r, dtype=torch.int32, device="cuda"))


def check_two_part() -> None:
    for fmt in (None, "int8", "fp8_e4m3", "nf4"):
        for window, lq in (((-1, 0), 1), ((511, 0), 1), ((-1, 0), 4)):
            call = _two_part(fmt, window=window, lq=lq)
            mine, mine_lse = dispatch.backend("triton").ops.decode(call)
            ref, ref_lse = dispatch.backend("torch").ops.decode(call)
            error = (mine.float() - ref.float()).abs().max().item()
            lse_error = (mine_lse - ref_lse).abs().max().item()
            status = "ok" if error < 2e-2 and lse_error < 1e-3 else "MISMATCH"
            print(f"two-part {fmt or 'bf16'} window={window} lq={lq}: max |out diff| {error:.2e}, "
                  f"|lse diff| {lse_error:.2e} {status}")


def check_plan_groups() -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    batch, total, d = 4, 2048, 128
    k, v = (torch.randn(batch, total, 8, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    q = torch.randn(batch, 1, 32, d, device="cuda", dtype=torch.bfloat16, generator=g)
    pads = [0, 5, 0, 100]
    plan = DecodePlan(batch, 1, group_rows(pads, "cuda"))
    layer = LayerKV(CacheSide(k, None, "none", d), CacheSide(v, None, "none", d), total)
    out = plan.run(q, layer, scale=d ** -0.5)
    worst = 0.0
    for b, pad in enumerate(pads):
        ref = mfa_hf.flash_attn_func(q[b: b + 1], k[b: b + 1, pad:], v[b: b + 1, pad:], causal=True)
        worst = max(worst, (out[b: b + 1].float() - ref.float()).abs().max().item())
    print(f"plan with pad groups {pads}: max |diff| vs per-row flash_attn_func {worst:.2e} "
          f"{'ok' if worst < 2e-2 else 'MISMATCH'}")


def host_time_per_layer(layers: int = 32, steps: int = 50) -> None:
    """Host µs per layer of one decode step: DecodePlan.run (built once per step) vs flash_attn_with_kvcache
    per layer, both over the same plain cache (B=1, Hq=32, Hkv=8, D=128, 4096 keys)."""
    cache = torch.randn(1, 4096, 8, 128, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    layer = LayerKV(CacheSide(cache, None, "none", 128), CacheSide(cache, None, "none", 128), 4096)

    def plan_step():
        plan = DecodePlan(1, 1)
        for _ in range(layers):
            plan.run(q, layer, scale=0.088)

    def api_step():
        for _ in range(layers):
            mfa_hf.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=4096, softmax_scale=0.088, causal=True)

    for name, step in (("DecodePlan.run", plan_step), ("flash_attn_with_kvcache", api_step)):
        step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        host = (time.perf_counter() - start) / (steps * layers) * 1e6
        torch.cuda.synchronize()
        print(f"host µs per layer, {name}: {host:.1f}")


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "MFA_BACKEND", os.environ.get("MFA_BACKEND"))
    with torch.no_grad():
        check_two_part()
        check_plan_groups()
        host_time_per_layer()
