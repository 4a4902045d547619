"""Sliding-window and softcap problems: our Triton kernels against compiled FlexAttention (issue 19).

    PYTHONPATH=. MFA_BACKEND=triton python benchmarks/triton/flex_features.py [--out DIR]

B x N = 16384 tokens, 16 heads, D = 128, bf16, causal, N in {2048, 8192}; problems: a left window of
1024 keys (Mistral/Gemma-style local layers), softcap 30 (Gemma-2), and both. FlexAttention gets the
same semantics as a block mask (window, causal) and a score_mod (softcap), compiled once per problem;
each pair is checked for agreement before it is timed. Forward and forward+backward, CUDA-event medians
side by side in one run; ratio = flex time / ours (>= 1.0: ours is faster). Softcap problems also time our
kernels with the other softcap tanh than the default (binding.HARDWARE_TANH: "mfa_triton_hardware_tanh" or
"mfa_triton_exact_tanh").
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import torch

import mfa_hf
from mfa_hf.benchmark.measure import cuda_median_ms
from mfa_hf.kernels.triton import binding, forward

WINDOW, SOFTCAP = 1024, 30.0
LENGTHS = tuple(int(n) for n in os.environ.get("FLEX_LENGTHS", "2048,8192").split(","))
PROBLEMS = {"window": (WINDOW, 0.0), "softcap": (-1, SOFTCAP), "window+softcap": (WINDOW, SOFTCAP)}


def _flex(n: int, left: int, softcap: float):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.reset()  # one compile per problem (dynamo's recompile limit would fall back to eager)
    compiled = torch.compile(flex_attention, dynamic=False)

    def visible(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx
        return keep & (q_idx - kv_idx <= left) if left >= 0 else keep

    mask = create_block_mask(visible, None, None, n, n, device="cuda")

    def capped(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    def call(q, k, v):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                           score_mod=capped if softcap else None)
        if any("torch.compile" in str(w.message) for w in caught):
            raise RuntimeError("flex_attention ran unfused: not measured")
        return out.transpose(1, 2)

    return call


def _ours(left: int, softcap: float):
    def call(q, k, v):
        return mfa_hf.flash_attn_func(q, k, v, causal=True, window_size=(left, 0) if left >= 0 else (-1, 0),
                                      softcap=softcap)
    return call


class _Tanh:
    """Our kernels with the hardware (or exact) softcap tanh while inside; the launch plans are forgotten on the way
    in and out."""

    def __init__(self, hardware: bool):
        self.hardware = hardware

    def __enter__(self):
        self.saved, binding.HARDWARE_TANH = binding.HARDWARE_TANH, self.hardware
        forward.forget_plans()

    def __exit__(self, *exc):
        binding.HARDWARE_TANH = self.saved
        forward.forget_plans()


def _timed(fn, q, k, v, backward: bool) -> float:
    if isinstance(fn, tuple):  # (fn, context to time it in)
        fn, context = fn
        with context:
            return _timed(fn, q, k, v, backward)
    if not backward:
        with torch.no_grad():
            return cuda_median_ms(lambda: fn(q, k, v))["median_ms"]
    grad = torch.randn_like(q)

    def step():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad)
    return cuda_median_ms(step)["median_ms"]


def run() -> list[dict]:
    rows = []
    for n in LENGTHS:
        batch, heads, dim = 16384 // n, 16, 128
        q, k, v = (torch.randn(batch, n, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        for name, (left, softcap) in PROBLEMS.items():
            impls = {"mfa_triton": _ours(left, softcap), "flex": _flex(n, left, softcap)}
            with torch.no_grad():
                diff = (impls["mfa_triton"](q, k, v).float() - impls["flex"](q, k, v).float()).abs().max().item()
            row = {"problem": name, "seqlen": n, "batch": batch, "max_abs_diff": round(diff, 5)}
            if softcap:
                other = not binding.HARDWARE_TANH
                name_other = "mfa_triton_hardware_tanh" if other else "mfa_triton_exact_tanh"
                with torch.no_grad(), _Tanh(other):
                    theirs = impls["flex"](q, k, v).float()
                    row[f"{name_other}_max_abs_diff"] = round((impls["mfa_triton"](q, k, v).float() - theirs)
                                                              .abs().max().item(), 5)
                impls[name_other] = (_ours(left, softcap), _Tanh(other))
            for backward in (False, True):
                times = {impl: _timed(fn, q, k, v, backward) for impl, fn in impls.items()}
                pass_ = "fwd+bwd" if backward else "fwd"
                row[f"{pass_}_ms"] = {impl: round(ms, 4) for impl, ms in times.items()}
                row[f"{pass_}_flex_over_ours"] = round(times["flex"] / times["mfa_triton"], 3)
            print(row, flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "MFA_BACKEND", os.environ.get("MFA_BACKEND"),
          flush=True)
    results = run()
    if args.out:
        with open(os.path.join(args.out, "flex_features.json"), "w") as f:
            json.dump(results, f, indent=1)
