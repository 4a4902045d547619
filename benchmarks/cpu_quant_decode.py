"""One decode attention call on CPU over a quantized cache against SDPA on the float32 cache, interleaved.

    python benchmarks/cpu_quant_decode.py --contexts 1024 8192 --rounds 60
    python benchmarks/cpu_quant_decode.py --contexts 16384 32768 --heads 32 8 --dim 128 --layers 8

Shape of smollm-135m's attention by default (9 query heads, 3 KV heads, D 64, batch 1, one query row). Per
context, every variant runs once per round in turn (a slow spell of a noisy host lands on all of them); the
table gives the median and the fastest time per call and the median as a multiple of SDPA's. With --layers N,
each variant cycles through N caches of its own (one per layer, as a model's decode step reads them), so the
caches come from memory rather than from the last call's cache lines. Variants: sdpa (float32 cache, heads
first, as transformers' DynamicCache holds it), then our torch backend's CPU decode over each format
(kernels/torch/cpu_fused_decode.decode, the attention alone: no validation, no append), where int8 takes the
path the gate picks: `int8 intmm` forces the integer-matmul path (cpu_int8_products), `int8 widened` the
widening one (cpu_scaled_codes), `int8 flash` dequantize + fused-kernel chunks (both switched off), and
`int8 api`, the whole flash_attn_with_kvcache call without an append.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools

import torch

import mfa_hf
from interleaved import interleaved_seconds, print_header, summary  # benchmarks/interleaved.py, beside this file
from mfa_hf.kernels.contract import CacheSide, DecodeCall, Options
from mfa_hf.kernels.torch import cpu_fused_decode, cpu_int8_products, cpu_scaled_codes


def variants(context: int, heads_q: int, heads_kv: int, dim: int, layers: int) -> dict:
    torch.manual_seed(0)
    lengths = torch.tensor([context], dtype=torch.int32)
    q = torch.randn(1, 1, heads_q, dim)
    plain, calls, apis = [], {fmt: [] for fmt in ("int8", "fp8_e4m3", "nf4")}, []
    for _ in range(layers):
        k, v = torch.randn(1, context, heads_kv, dim), torch.randn(1, context, heads_kv, dim)
        plain.append((k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()))
        for fmt, found in calls.items():
            qk, qv = mfa_hf.quantize_kv(k, fmt), mfa_hf.quantize_kv(v, fmt)
            found.append(DecodeCall(q, CacheSide(qk.codes, qk.scales, fmt, qk.group_size),
                                    CacheSide(qv.codes, qv.scales, fmt, qv.group_size), lengths,
                                    Options(dim ** -0.5, -1, 0)))
            if fmt == "int8":
                apis.append((qk, qv))
    q_first = q.transpose(1, 2)
    layer = itertools.cycle(range(layers))
    found = {"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q_first, *plain[next(layer)],
                                                                                enable_gqa=True)}
    for fmt, fmt_calls in calls.items():
        found[fmt] = lambda fmt_calls=fmt_calls: cpu_fused_decode.decode(fmt_calls[next(layer)], context)
    int8 = calls["int8"]
    found["int8 intmm"] = lambda: _with(((cpu_int8_products, "MIN_KEYS", 1),),
                                        lambda: cpu_fused_decode.decode(int8[next(layer)], context))
    found["int8 widened"] = lambda: _with(((cpu_int8_products, "ENABLED", False),),
                                          lambda: cpu_fused_decode.decode(int8[next(layer)], context))
    found["int8 flash"] = lambda: _with(((cpu_int8_products, "ENABLED", False), (cpu_scaled_codes, "ENABLED", False)),
                                        lambda: cpu_fused_decode.decode(int8[next(layer)], context))
    found["int8 api"] = lambda: mfa_hf.flash_attn_with_kvcache(q, *apis[next(layer)], cache_seqlens=lengths,
                                                               causal=True)
    return found


def _with(settings, run):
    """run() with each (module, name, value) set, then restored."""
    with contextlib.ExitStack() as stack:
        for module, name, value in settings:
            stack.callback(setattr, module, name, getattr(module, name))
            setattr(module, name, value)
        return run()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--heads", type=int, nargs=2, default=[9, 3], metavar=("HQ", "HKV"))
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=1, help="caches per variant, cycled (as a model's layers)")
    args = parser.parse_args()
    print_header(f"one decode call, Hq {args.heads[0]} Hkv {args.heads[1]} D {args.dim}, {args.layers} cache(s) "
                 "per variant", args.rounds, ("context", "variant", "median us", "min us", "median x sdpa"))
    for context in args.contexts:
        times = interleaved_seconds(variants(context, *args.heads, args.dim, args.layers), args.rounds)
        for name, median, fastest, relative in summary(times):
            print(f"| {context} | {name} | {median * 1e6:.0f} | {fastest * 1e6:.0f} | {relative:.2f} |")


if __name__ == "__main__":
    main()
