"""Decode suite: one new token over a KV cache of 4k / 16k / 64k tokens, per cache format.

    python -m mfa_hf.benchmark --suite decode [--device cpu|cuda|mps] [--full-size]

Rows compare mfa_hf.flash_attn_with_kvcache on a plain (bf16/fp32) or quantized cache with
torch.nn.functional.scaled_dot_product_attention on a bf16 and an fp32 cache (GQA, Llama-like
heads: 32 query heads over 8 KV heads of 128). cache_mb is K + V as stored (codes + scales);
x_sdpa_bf16 is SDPA-bf16's median time over the row's (above 1: the row is faster). Each row is
measured in its own subprocess (runner.py), this module's __main__ being the worker.
"""

from __future__ import annotations

import json
import sys
from typing import Callable

import torch

from .measure import peak_memory, ratio, significant, start_memory, timed_then_named
from .runner import measure_in_subprocess

KV_LENGTHS = (4096, 16384, 65536)
HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 128
IMPLS = (  # (impl, cache format, cache dtype)
    ("sdpa", "bf16", "bfloat16"), ("sdpa", "fp32", "float32"),
    ("mfa", "bf16", "bfloat16"), ("mfa", "fp8_e4m3", "bfloat16"), ("mfa", "fp8_e5m2", "bfloat16"),
    ("mfa", "int8", "bfloat16"), ("mfa", "nf4", "bfloat16"),
)


def run(device: str, quick: bool, progress: Callable[[str], None]) -> list[dict]:
    batch = 1 if quick else 4
    jobs = [(length, impl) for length in KV_LENGTHS for impl in IMPLS]
    rows, sdpa_ms = [], {}
    for i, (length, (impl, fmt, dtype)) in enumerate(jobs, 1):
        progress(f"[{i}/{len(jobs)}] {impl} {fmt} kv_len={length} batch={batch}")
        spec = dict(impl=impl, format=fmt, dtype=dtype, kv_len=length, batch=batch, device=device,
                    repeats=3 if length >= 65536 else 5)
        row = measure_in_subprocess("mfa_hf.benchmark.suite_decode", spec)
        if (impl, fmt) == ("sdpa", "bf16"):
            sdpa_ms[length] = row["median_ms"]
        row["x_sdpa_bf16"] = ratio(sdpa_ms[length], row["median_ms"])
        rows.append(row)
    return rows


def _cache_and_call(spec: dict):
    """(call, cache bytes) for one row: the cache is filled once, the call decodes one token."""
    import torch.nn.functional as F

    import mfa_hf

    device, dtype, length, batch = spec["device"], getattr(torch, spec["dtype"]), spec["kv_len"], spec["batch"]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 1, HEADS_Q, HEAD_DIM, generator=g).to(device, dtype)
    k, v = (torch.randn(batch, length, HEADS_KV, HEAD_DIM, generator=g).to(device, dtype) for _ in range(2))
    if spec["impl"] == "sdpa":
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        del k, v
        return (lambda: F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True)), 2 * kh.nbytes
    if spec["format"] in ("bf16", "fp32"):
        k_cache, v_cache, nbytes = k, v, k.nbytes + v.nbytes
    else:
        k_cache, v_cache = mfa_hf.quantize_kv(k, spec["format"]), mfa_hf.quantize_kv(v, spec["format"])
        nbytes = k_cache.nbytes() + v_cache.nbytes()
        del k, v
    lengths = torch.full((batch,), length, dtype=torch.int32, device=device)
    return (lambda: mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)), nbytes


def measure(spec: dict) -> dict:
    from mfa_hf import trace

    call, nbytes = _cache_and_call(spec)
    before = start_memory(spec["device"])
    with torch.inference_mode():
        timing, calls, _ = timed_then_named(call, spec["device"], spec.get("repeats", 5), warmup=2)
    served = sorted({backend for backend, _ in trace.served_by(calls)})
    tokens = spec["batch"] * spec["kv_len"]
    return {**spec, **timing, **peak_memory(spec["device"], before), "cache_mb": significant(nbytes / 2**20),
            "bytes_per_token": round(nbytes / tokens, 1), "served_by": "+".join(served) or "torch.nn.functional"}


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
