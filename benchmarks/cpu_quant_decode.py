"""One decode attention call on CPU over a quantized cache against SDPA on the float32 cache, interleaved.

    python benchmarks/cpu_quant_decode.py --contexts 1024 8192 --rounds 60

Shape of smollm-135m's attention by default (9 query heads, 3 KV heads, D 64, batch 1, one query row). Per
context, every variant runs once per round in turn (a slow spell of a noisy host lands on all of them); the
table gives the median and the fastest time per call and the median as a multiple of SDPA's. Variants:
sdpa (float32 cache, heads first, as transformers' DynamicCache holds it), then our torch backend's CPU decode
over each format (kernels/torch/cpu_fused_decode.decode, the attention alone: no validation, no append),
`int8 flash` being int8 through the dequantize + fused-kernel chunks (cpu_scaled_codes switched off), and
`int8 api`, the whole flash_attn_with_kvcache call without an append.
"""

from __future__ import annotations

import argparse

import torch

import mfa_hf
from interleaved import interleaved_seconds, print_header, summary  # benchmarks/interleaved.py, beside this file
from mfa_hf.kernels.contract import CacheSide, DecodeCall, Options
from mfa_hf.kernels.torch import cpu_fused_decode, cpu_scaled_codes


def variants(context: int, heads_q: int, heads_kv: int, dim: int) -> dict:
    torch.manual_seed(0)
    k, v = torch.randn(1, context, heads_kv, dim), torch.randn(1, context, heads_kv, dim)
    q = torch.randn(1, 1, heads_q, dim)
    k_first, v_first, q_first = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), q.transpose(1, 2)
    lengths = torch.tensor([context], dtype=torch.int32)
    found = {"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q_first, k_first, v_first,
                                                                                enable_gqa=True)}
    caches = {}
    for fmt in ("int8", "fp8_e4m3", "nf4"):
        qk, qv = mfa_hf.quantize_kv(k, fmt), mfa_hf.quantize_kv(v, fmt)
        caches[fmt] = qk, qv
        call = DecodeCall(q, CacheSide(qk.codes, qk.scales, fmt, qk.group_size),
                          CacheSide(qv.codes, qv.scales, fmt, qv.group_size), lengths, Options(dim ** -0.5, -1, 0))
        found[fmt] = lambda call=call: cpu_fused_decode.decode(call, context)
        if fmt == "int8":
            found["int8 flash"] = lambda call=call: _without_scaled_codes(call, context)
    qk, qv = caches["int8"]
    found["int8 api"] = lambda: mfa_hf.flash_attn_with_kvcache(q, qk, qv, cache_seqlens=lengths, causal=True)
    return found


def _without_scaled_codes(call, context):
    cpu_scaled_codes.ENABLED = False
    try:
        return cpu_fused_decode.decode(call, context)
    finally:
        cpu_scaled_codes.ENABLED = True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--heads", type=int, nargs=2, default=[9, 3], metavar=("HQ", "HKV"))
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    print_header(f"one decode call, Hq {args.heads[0]} Hkv {args.heads[1]} D {args.dim}", args.rounds,
                 ("context", "variant", "median us", "min us", "median x sdpa"))
    for context in args.contexts:
        times = interleaved_seconds(variants(context, *args.heads, args.dim), args.rounds)
        for name, median, fastest, relative in summary(times):
            print(f"| {context} | {name} | {median * 1e6:.0f} | {fastest * 1e6:.0f} | {relative:.2f} |")


if __name__ == "__main__":
    main()
