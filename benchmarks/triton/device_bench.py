"""One-call device measurements for the Triton backend (issue 9): decode, FlexAttention, small-N forward.

    PYTHONPATH=. python benchmarks/triton/device_bench.py decode [--out DIR]
    PYTHONPATH=. python benchmarks/triton/device_bench.py flex forward [--out DIR]

The JSON rows go to DIR (default: $OUT if set, else benchmarks/results/).

decode: the copy bandwidth (device-to-device copy, bytes read + written), then for B=8, Hq=32, Hkv=8,
D=128, q_len 1 at KV length 4k/16k/64k: SDPA (bf16, enable_gqa) and our decode op on a bf16 cache and
on each quantized format; a launch-config sweep at 64k first, the best config per format is used.
Each implementation is checked against float32 attention on the dequantized cache before timing.
Times: triton.testing.do_bench medians (CUDA events, L2 flushed between calls). GB/s = K+V bytes as
stored (codes + scales) / time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")  # benchmarks/results
B, HQ, HKV, D = 8, 32, 8, 128
LENGTHS = tuple(int(n) for n in os.environ.get("DECODE_LENGTHS", "4096,16384,65536").split(","))
FORMATS = tuple(os.environ.get("DECODE_FORMATS", "bf16,fp8_e4m3,fp8_e5m2,int8,nf4").split(","))
SWEEP = os.environ.get("DECODE_SWEEP", "1") != "0"  # 0: the backend's default launch configs, no sweep
CONFIGS = [dict(block_n=n, num_warps=w, num_stages=s)
           for n, w, s in ((64, 4, 3), (128, 4, 3), (64, 8, 3), (128, 8, 3), (32, 4, 4), (64, 4, 4),
                           (128, 8, 2), (64, 2, 3), (128, 4, 4), (256, 4, 3), (256, 8, 3), (256, 8, 4))]


def _ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    x = torch.randn(2**29 // 2, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    y = torch.empty_like(x)
    ms = _ms(lambda: y.copy_(x))
    return 2 * x.nbytes / ms / 1e6  # GB/s


def _parts(cache):
    import mfa_hf

    if isinstance(cache, mfa_hf.QuantizedKV):
        return cache.codes, cache.scales, cache.format.value, cache.group_size, cache.nbytes()
    return cache, None, "none", cache.shape[-1], cache.nbytes


def _decode_problem(length: int):
    """q (B, 1, Hq, D), k/v (B, length, Hkv, D) bf16, full lengths, and SDPA's bf16 decode time on them."""
    g = torch.Generator(device="cuda").manual_seed(length)
    q = torch.randn(B, 1, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, length, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, length, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    seqlens = torch.full((B,), length, dtype=torch.int32, device="cuda")
    kh, vh = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    qh = q.transpose(1, 2)
    sdpa_ms = _ms(lambda: F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True))
    return q, k, v, seqlens, sdpa_ms, kh.nbytes + vh.nbytes


def _decode_cache(q, k, v, seqlens, fmt: str):
    """(k_cache, v_cache, bytes as stored, call(cfg, splits) running the decode op launcher directly)."""
    import mfa_hf
    from mfa_hf.kernels.triton import decode as td

    k_cache, v_cache = (k, v) if fmt == "bf16" else (mfa_hf.quantize_kv(k, fmt), mfa_hf.quantize_kv(v, fmt))
    kc, ks, kf, kg, kb = _parts(k_cache)
    vc, vs, vf, vg, vb = _parts(v_cache)

    def call(cfg=None, splits=0):
        from mfa_hf.kernels.contract import DecodeCall

        return td.decode(DecodeCall.from_op_args((q, kc, ks, vc, vs, seqlens, None, None, None, kf, vf, kg, vg,
                                                  1 / math.sqrt(D), -1, 0, 0.0, splits)), config=cfg)

    return k_cache, v_cache, kb + vb, call


def _decode_reference(q, k, v, k_cache, v_cache, fmt: str):
    """float32 attention on the dequantized cache."""
    kd = k.float() if fmt == "bf16" else k_cache.dequantize(torch.float32)
    vd = v.float() if fmt == "bf16" else v_cache.dequantize(torch.float32)
    return F.scaled_dot_product_attention(q.float().transpose(1, 2), kd.transpose(1, 2), vd.transpose(1, 2),
                                          enable_gqa=True).transpose(1, 2)


def _checked(out, ref) -> tuple[float, bool]:
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    return rel, rel < 1e-2 and not out.isnan().any().item()


def decode(out_dir: str) -> list[dict]:
    import mfa_hf

    copy = copy_bandwidth()
    print(f"copy bandwidth: {copy:.0f} GB/s", flush=True)
    rows = [dict(kind="copy", gbps=round(copy))]
    best_cfg = {}
    for length in sorted(LENGTHS, reverse=True):  # 64k first: the sweep runs there
        q, k, v, seqlens, sdpa_ms, sdpa_bytes = _decode_problem(length)
        rows.append(dict(kind="decode", impl="sdpa", format="bf16", kv_len=length, ms=round(sdpa_ms, 4),
                         gbps=round(sdpa_bytes / sdpa_ms / 1e6)))
        print(rows[-1], flush=True)
        for fmt in FORMATS:
            k_cache, v_cache, nbytes, call = _decode_cache(q, k, v, seqlens, fmt)
            if length == min(LENGTHS):  # correctness on the dequantized cache (float32 attention)
                rel, ok = _checked(call()[0], _decode_reference(q, k, v, k_cache, v_cache, fmt))
                print(f"check {fmt}: rel err {rel:.2e} {'ok' if ok else 'FAILED'}", flush=True)
                rows.append(dict(kind="check", format=fmt, rel_err=rel, ok=ok))
            if length == max(LENGTHS) and fmt in ("bf16", "int8", "nf4", "fp8_e4m3") and SWEEP:
                sweep = []
                for cfg in CONFIGS:
                    try:
                        sweep.append((_ms(lambda: call(cfg)), cfg))
                    except Exception as error:  # noqa: BLE001 - e.g. out of shared memory
                        print(f"  config {cfg} failed: {type(error).__name__}: {str(error)[:100]}")
                sweep.sort(key=lambda item: item[0])
                for ms, cfg in sweep:
                    print(f"  sweep {fmt} 64k {cfg}: {ms:.4f} ms {nbytes / ms / 1e6:.0f} GB/s", flush=True)
                best_cfg[fmt] = sweep[0][1]
                rows.append(dict(kind="sweep", format=fmt, results=[(round(ms, 4), cfg) for ms, cfg in sweep]))
                for splits in (8, 16, 32, 64):
                    ms = _ms(lambda: call(best_cfg[fmt], splits))
                    print(f"  splits {splits}: {ms:.4f} ms", flush=True)
                    rows.append(dict(kind="splits", format=fmt, splits=splits, ms=round(ms, 4)))
            cfg = best_cfg.get(fmt, best_cfg.get("int8" if fmt.startswith("fp8") else "bf16"))
            ms = _ms(lambda: call(cfg))
            api_ms = _ms(lambda: mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens))
            # an int length is checked on the host: nothing read back before the launch
            api_int_ms = _ms(lambda: mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=length))
            rows.append(dict(kind="decode", impl="mfa_triton", format=fmt, kv_len=length, ms=round(ms, 4),
                             api_ms=round(api_ms, 4), api_int_ms=round(api_int_ms, 4),
                             gbps=round(nbytes / ms / 1e6), pct_copy=round(100 * nbytes / ms / 1e6 / copy, 1),
                             x_sdpa=round(sdpa_ms / ms, 2), mb=round(nbytes / 2**20), cfg=cfg))
            print(rows[-1], flush=True)
            del k_cache, v_cache
        del k, v
        torch.cuda.empty_cache()
    _table(rows)
    _save(rows, out_dir, "decode.json")
    return rows


VARIANTS = {  # name -> decode config (the triton decode's config override). Run 1 (H100) also had 64-key/8-warp
    # asm variants (7-48% slower than asm128) and a no-tl.dot FMA path (8-120x slower, removed).
    "old": dict(block_n=128, num_warps=4, num_stages=3, asm=False),  # the previous session's kernel
    "bf16old": dict(block_n=64, num_warps=2, num_stages=3),  # its bf16 config
    "asm128": dict(block_n=128, num_warps=4, num_stages=3),
    "asm128s4": dict(block_n=128, num_warps=4, num_stages=4),
    "asm128s2": dict(block_n=128, num_warps=4, num_stages=2),
    "asm256": dict(block_n=256, num_warps=4, num_stages=3),
    "asm256w8": dict(block_n=256, num_warps=8, num_stages=3),
}


def variants(out_dir: str) -> list[dict]:
    """Decode variants (old kernel / packed-asm conversions with tl.dot / FMA path): check at 4k, time at 64k,
    then the best variant per format at 4k/16k/64k with the public API time."""
    import mfa_hf
    from mfa_hf.kernels.triton import decode as td

    copy = copy_bandwidth()
    print(f"copy bandwidth: {copy:.0f} GB/s", flush=True)
    rows = [dict(kind="copy", gbps=round(copy))]
    best = {}
    for step, length in enumerate((4096, 65536, 16384, 4096)):  # the first 4k pass only checks
        q, k, v, seqlens, sdpa_ms, _ = _decode_problem(length)
        rows.append(dict(kind="decode", impl="sdpa", format="bf16", kv_len=length, ms=round(sdpa_ms, 4), gbps=0))
        print(rows[-1], flush=True)
        for fmt in FORMATS:
            k_cache, v_cache, nbytes, call = _decode_cache(q, k, v, seqlens, fmt)
            names = [n for n in VARIANTS if (n == "bf16old") == (fmt == "bf16")]
            if step == 0:  # every variant against float32 attention on the dequantized cache
                ref = _decode_reference(q, k, v, k_cache, v_cache, fmt)
                for name in names:
                    try:
                        rel, ok = _checked(call(VARIANTS[name])[0], ref)
                    except Exception as error:  # noqa: BLE001
                        rel, ok = float("nan"), False
                        print(f"  {fmt} {name} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
                    print(f"check {fmt} {name}: rel err {rel:.2e} {'ok' if ok else 'FAILED'}", flush=True)
                    rows.append(dict(kind="check", format=fmt, variant=name, rel_err=rel, ok=ok))
                    if not ok:
                        VARIANTS_BAD.add((fmt, name))
                del ref
            if length == 65536:
                sweep = []
                for name in names:
                    if (fmt, name) in VARIANTS_BAD:
                        continue
                    ms = _ms(lambda: call(VARIANTS[name]))
                    sweep.append((ms, name))
                    print(f"  {fmt} 64k {name}: {ms:.4f} ms {nbytes / ms / 1e6:.0f} GB/s x{sdpa_ms / ms:.2f}", flush=True)
                sweep.sort()
                best[fmt] = sweep[0][1]
                rows.append(dict(kind="sweep", format=fmt, results=[(round(ms, 4), n) for ms, n in sweep]))
                for splits in (8, 32):
                    ms = _ms(lambda: call(VARIANTS[best[fmt]], splits))
                    print(f"  {fmt} 64k {best[fmt]} splits {splits}: {ms:.4f} ms", flush=True)
                    rows.append(dict(kind="splits", format=fmt, variant=best[fmt], splits=splits, ms=round(ms, 4)))
            if step > 0:
                name = best[fmt]
                ms = _ms(lambda: call(VARIANTS[name]))
                ms2 = _ms(lambda: call(VARIANTS[name]))  # the same version twice: the spread
                saved = dict(td.DECODE_CONFIG), dict(td.DECODE_CONFIG_QUANT)
                td.DECODE_CONFIG.update(VARIANTS[name])
                td.DECODE_CONFIG_QUANT.update(VARIANTS[name])
                try:
                    api_ms = _ms(lambda: mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens))
                finally:
                    for table, old in zip((td.DECODE_CONFIG, td.DECODE_CONFIG_QUANT), saved):
                        table.clear()
                        table.update(old)
                rows.append(dict(kind="decode", impl="mfa_triton", format=fmt, kv_len=length, variant=name,
                                 ms=round(ms, 4), ms_again=round(ms2, 4), api_ms=round(api_ms, 4),
                                 gbps=round(nbytes / ms / 1e6), pct_copy=round(100 * nbytes / ms / 1e6 / copy, 1),
                                 x_sdpa=round(sdpa_ms / ms, 2), mb=round(nbytes / 2**20)))
                print(rows[-1], flush=True)
            del k_cache, v_cache
        del k, v
        torch.cuda.empty_cache()
    _save(rows, out_dir, "variants.json")
    print("\n| KV len | format | variant | ms | again | api ms | GB/s | % copy | x SDPA |")
    for r in rows:
        if r["kind"] == "decode":
            print(f"| {r['kv_len']} | {r['format']} | {r.get('variant', 'sdpa')} | {r['ms']} | {r.get('ms_again', '')} | "
                  f"{r.get('api_ms', '')} | {r['gbps']} | {r.get('pct_copy', '')} | {r.get('x_sdpa', '')} |")
    return rows


VARIANTS_BAD: set = set()


def _table(rows):
    print("\n| KV len | format | impl | ms | api ms (tensor lengths) | api ms (int length) | GB/s | % copy | x SDPA bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted((r for r in rows if r["kind"] == "decode"), key=lambda r: (r["kv_len"], r["impl"] != "sdpa")):
        print(f"| {r['kv_len']} | {r['format']} | {r['impl']} | {r['ms']} | {r.get('api_ms', '')} | "
              f"{r.get('api_int_ms', '')} | {r['gbps']} | {r.get('pct_copy', '')} | {r.get('x_sdpa', '')} |")


def _save(rows, out_dir, name):
    if out_dir:
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(rows, f, indent=1, default=str)


def flex(out_dir: str) -> list[dict]:
    """FlexAttention compiled once per shape (block mask for causal) vs ours and SDPA-flash."""
    import torch._dynamo

    from mfa_hf.benchmark import suite_cuda

    torch._dynamo.config.suppress_errors = False  # a failed compile must show, not fall back silently
    rows = []
    for dim, causal, n in ((128, False, 512), (128, True, 2048), (128, False, 8192), (64, True, 8192)):
        rows += suite_cuda._measure_shape(torch.bfloat16, dim, causal, n, lambda s: print(s, flush=True))
    _save(rows, out_dir, "flex.json")
    return rows


def forward(out_dir: str) -> list[dict]:
    """Forward block-table sweep at small N (D=128 and 64, causal and not): TFLOP/s per config."""
    import mfa_hf
    from mfa_hf.kernels.triton import blocks
    from mfa_hf.kernels.triton import forward as triton_forward

    from triton.runtime.errors import OutOfResources  # noqa: F401 - the failure a config may hit

    configs = [blocks.Blocks(*c) for c in ((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3),
                                           (64, 128, 4, 3), (128, 32, 4, 4), (64, 64, 4, 4), (128, 64, 8, 4),
                                           (128, 128, 8, 2))]
    rows = []
    for dim in (128, 64):
        for causal in (False, True):
            for n in (512, 1024):
                batch, heads = 16384 // n, 2048 // dim
                q, k, v = (torch.randn(batch, n, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                flops = 4 * batch * heads * n * n * dim / (2 if causal else 1)
                results = []
                for cfg in configs:
                    table = blocks._FORWARD_CAUSAL if causal else blocks._FORWARD
                    saved = dict(table)
                    table[blocks.padded_dim(dim)] = cfg
                    triton_forward.forget_plans()  # launch plans hold the block choice
                    try:
                        ms = _ms(lambda: mfa_hf.flash_attn_func(q, k, v, causal=causal))
                        results.append((round(flops / ms / 1e9, 1), tuple(cfg.__dict__.values())))
                    except Exception as error:  # noqa: BLE001
                        print(f"  {cfg} failed: {type(error).__name__}")
                    finally:
                        table.clear()
                        table.update(saved)
                        triton_forward.forget_plans()
                results.sort(reverse=True)
                print(f"D={dim} causal={causal} N={n}: " + ", ".join(f"{t} {c}" for t, c in results[:4]), flush=True)
                rows.append(dict(dim=dim, causal=causal, n=n, results=results))
    _save(rows, out_dir, "forward.json")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("what", nargs="+", choices=("decode", "flex", "forward", "variants"))
    parser.add_argument("--out", default=os.environ.get("OUT") or RESULTS)
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), file=sys.stderr)
    for what in args.what:
        globals()[what](args.out)
