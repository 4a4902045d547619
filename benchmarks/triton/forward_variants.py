"""Forward kernel variants on one GPU, side by side with SDPA-flash and cuDNN: pointer loads vs TMA
descriptors (kernels/triton/tma.py) and block shapes. (Triton's warp specialization of the inner loop was timed
too, in the 2026-12-04 logs, gained nothing on Hopper and is no longer a kernel option.)

    MFA_BACKEND=triton PYTHONPATH=. python benchmarks/triton/forward_variants.py [--out DIR] [--quick | --small]

Every variant's output is compared with the shipped default's and with SDPA's before it is timed (a variant
that differs by more than bf16 rounding is reported, not timed). Times: triton.testing.do_bench medians.
Prints one line per (shape, variant) and writes forward_variants.json to DIR ($OUT if set).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import mfa_hf
from mfa_hf.kernels.triton import blocks, forward, tma
from mfa_hf.kernels.triton.binding import strides4

VARIANTS = {  # name -> (TMA: True / False / None for the table's, (block_m, block_n, num_warps, num_stages) or None
    #          for the table's)
    "table": (None, None),
    "ptr": (False, None),
    "tma": (True, None),
    "tma-128x128x8x3": (True, (128, 128, 8, 3)),
    "tma-128x64x8x3": (True, (128, 64, 8, 3)),
    "tma-128x64x8x4": (True, (128, 64, 8, 4)),
    "tma-128x64x4x3": (True, (128, 64, 4, 3)),
    "ptr-128x64x8x3": (False, (128, 64, 8, 3)),
    "ptr-128x64x4x3": (False, (128, 64, 4, 3)),
    "ptr-128x128x8x3": (False, (128, 128, 8, 3)),
    "ptr-64x128x4x3": (False, (64, 128, 4, 3)),
    "ptr-64x64x4x4": (False, (64, 64, 4, 4)),
    # short sequences (--small): the SMALL_N entry (64, 64, 4, 3) and its neighbours
    "ptr-64x64x4x2": (False, (64, 64, 4, 2)),
    "ptr-64x32x4x3": (False, (64, 32, 4, 3)),
    "ptr-64x64x8x3": (False, (64, 64, 8, 3)),
    "ptr-32x64x4x3": (False, (32, 64, 4, 3)),
    "ptr-64x128x8x3": (False, (64, 128, 8, 3)),
    "tma-64x64x4x3": (True, (64, 64, 4, 3)),
}
_make_plan = forward._make_plan


def _use(variant: str) -> None:
    use_tma, shape = VARIANTS[variant]

    def make_plan(call):
        plan = _make_plan(call)
        layout_ok = tma.chosen(True, call.k, call.v, strides4(call.k), strides4(call.v))
        options = dict(plan.options)
        if use_tma is not None:
            options["TMA"] = use_tma and layout_ok
        grid = plan.grid
        if shape is not None:
            options.update(BLOCK_M=shape[0], BLOCK_N=shape[1], num_warps=shape[2], num_stages=shape[3])
            grid = (blocks.cdiv(call.seqlen_q, shape[0]), grid[1])
        return dataclasses.replace(plan, options=options, grid=grid)

    forward._make_plan = make_plan
    forward.forget_plans()


def _ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _host_us(fn, calls: int = 300) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="two shapes only")
    parser.add_argument("--small", action="store_true",
                        help="D 128 at N 512 and 1024 with 16k tokens a call (host_overhead.py's shapes)")
    parser.add_argument("--lengths", default="", help="with --small: comma-separated N (default 512,1024)")
    parser.add_argument("--variants", default="", help="comma-separated names of VARIANTS (default: all)")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v] or list(VARIANTS)
    shapes = [(d, causal, n) for d in (128, 64) for causal in (False, True) for n in (1024, 4096, 16384)]
    tokens = 65536
    if args.quick:
        shapes = [(128, False, 16384), (128, True, 4096)]
    if args.small:
        lengths = [int(n) for n in args.lengths.split(",") if n] or [512, 1024]
        shapes, tokens = [(128, causal, n) for causal in (False, True) for n in lengths], 16384
    rows = []
    for dim, causal, n in shapes:
        heads = 2048 // dim
        batch = max(1, tokens // n)
        g = torch.Generator(device="cuda").manual_seed(n + dim)
        q, k, v = (torch.randn(batch, n, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        flops = 4 * batch * heads * n * n * dim / (2 if causal else 1)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        base = {}
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            with sdpa_kernel(backend):
                ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
                base[name] = _ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
            rows.append(dict(dim=dim, causal=causal, n=n, impl=name, ms=round(base[name], 4),
                             tflops=round(flops / base[name] / 1e9, 1)))
        default = None
        for variant in variants:
            _use(variant)
            try:
                out = mfa_hf.flash_attn_func(q, k, v, causal=causal)
                torch.cuda.synchronize()
            except Exception as error:  # noqa: BLE001 - a variant Triton cannot build is reported
                print(f"D={dim} causal={causal} N={n} {variant}: {type(error).__name__}: {str(error)[:200]}", flush=True)
                rows.append(dict(dim=dim, causal=causal, n=n, impl=variant, error=type(error).__name__))
                continue
            if default is None:
                default = out
            vs_default = (out.float() - default.float()).abs().max().item()
            vs_sdpa = (out.float() - ref.float()).abs().max().item()
            row = dict(dim=dim, causal=causal, n=n, impl=variant, vs_default=vs_default, vs_sdpa=vs_sdpa)
            if vs_sdpa > 0.05 or not out.isfinite().all():
                row["error"] = "wrong result"
            else:
                ms = _ms(lambda: mfa_hf.flash_attn_func(q, k, v, causal=causal))
                row.update(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1),
                           x_flash=round(base["sdpa_flash"] / ms, 3), x_cudnn=round(base["cudnn"] / ms, 3))
            print(f"D={dim} causal={causal} N={n} B={batch}: {row}", flush=True)
            rows.append(row)
        print(f"D={dim} causal={causal} N={n}: sdpa_flash {base['sdpa_flash']:.4f} ms, cudnn {base['cudnn']:.4f} ms",
              flush=True)
    # Host cost per call on a small problem, pointer loads vs TMA (the TMA launch allocates descriptor scratch).
    q, k, v = (torch.randn(1, 128, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for variant in ("ptr", "tma"):
        _use(variant)
        us = _host_us(lambda: mfa_hf.flash_attn_func(q, k, v, causal=True))
        print(f"host per call, {variant}: {us:.1f} us", flush=True)
        rows.append(dict(impl=variant, host_us=round(us, 1)))
    forward._make_plan = _make_plan
    forward.forget_plans()
    with open(os.path.join(args.out, "forward_variants.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
