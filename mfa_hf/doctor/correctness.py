"""The correctness matrix: the metal backend (forced, as MFA_BACKEND=metal does) on the runtime's
device against the float64 CPU reference (kernels/reference.py), with the project's tolerance rule
(DESIGN.md; mfa_hf.testing: 2 x PyTorch's own error in the dtype + a floor, 3 x for gradients and
softcap). Outputs are poisoned with NaN before each kernel runs, and each check asserts that the
metal backend really served the call (mfa_hf.trace).
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .progress import run_each
from .variants import short


@dataclass(frozen=True)
class Check:
    id: str
    kind: str  # forward+backward, forward, varlen, decode
    dtype: torch.dtype
    run: Callable[[str], str]  # device -> detail; raises AssertionError when a result is wrong


@contextmanager
def metal_forced() -> Iterator[None]:
    """MFA_BACKEND=metal and NaN-poisoned outputs for the block; both restored after."""
    from mfa_hf.kernels import launch as ops  # POISON_OUTPUTS lives with the output allocation

    saved_env, saved_poison = os.environ.get("MFA_BACKEND"), ops.POISON_OUTPUTS
    os.environ["MFA_BACKEND"] = "metal"
    ops.POISON_OUTPUTS = True
    try:
        yield
    finally:
        ops.POISON_OUTPUTS = saved_poison
        if saved_env is None:
            os.environ.pop("MFA_BACKEND", None)
        else:
            os.environ["MFA_BACKEND"] = saved_env


def run_matrix(device: str, mode: str, checks: list[Check] | None = None,
               progress: Callable[[str], None] = lambda line: None) -> list[dict]:
    checks = CHECKS if checks is None else checks
    with metal_forced():
        return run_each(checks, lambda check: run_check(check, device, mode), f"correctness ({mode}) checks", 5,
                        progress)


def run_check(check: Check, device: str, mode: str) -> dict:
    row = {"mode": mode, "id": check.id, "kind": check.kind, "dtype": short(check.dtype), "status": "failed",
           "detail": "", "seconds": 0.0}
    start = time.perf_counter()
    try:
        row["detail"] = check.run(device)
        row["status"] = "passed"
    except AssertionError as error:
        row["detail"] = f"wrong result: {error}"
    except Exception as error:  # a crash is a failure too, reported with what raised it
        row["detail"] = f"{type(error).__name__}: {error}"[:2000]
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


# ---------------------------------------------------------------------------------------------
# Dense calls (flash_attn_func): forward and, where asked, every input gradient.


def dense(case, gradients: bool = True, mask: Callable[[], torch.Tensor] | None = None) -> Callable[[str], str]:
    """mfa_hf.testing.check_against_reference on `case`; `mask` replaces the attention mask it draws."""

    def run(device: str) -> str:
        from mfa_hf.testing import check_against_reference, run_public_api

        def call(case, inputs, **extra):
            if mask is not None:
                inputs["attn_mask"] = mask().to(device)
            return run_public_api(case, inputs, **extra)

        check_against_reference(case, call, backend="metal", gradients=gradients, device=device)
        return "out, lse" + (", input gradients" if gradients else "") + " within tolerance"

    return run


def left_padded_mask(batch: int, lk: int, padding: int) -> Callable[[], torch.Tensor]:
    """(B, 1, 1, Lk) bool: the last batch row's first `padding` keys masked (a left-padded prompt)."""

    def make() -> torch.Tensor:
        keep = torch.ones(batch, 1, 1, lk, dtype=torch.bool)
        keep[-1, ..., :padding] = False
        return keep

    return make


def varlen(dtype: torch.dtype, lengths: tuple[int, ...], dim: int) -> Callable[[str], str]:
    def run(device: str) -> str:
        import mfa_hf
        from mfa_hf import trace
        from mfa_hf.kernels.reference import attention_reference_varlen
        from mfa_hf.testing import FORWARD_FACTOR, assert_close_to_reference

        g = torch.Generator().manual_seed(3)
        total = sum(lengths)
        q, k, v = (torch.randn(total, h, dim, generator=g).to(dtype) for h in (4, 2, 2))
        cu = torch.tensor([0, *itertools_accumulate(lengths)], dtype=torch.int32)
        with trace.capture() as calls:
            out, lse = mfa_hf.flash_attn_varlen_func(q.to(device), k.to(device), v.to(device), cu.to(device),
                                                     cu.to(device), max(lengths), max(lengths), causal=True,
                                                     return_lse=True)
        _served(calls, "fwd")
        ref, ref_lse = attention_reference_varlen(q, k, v, cu, cu, causal=True)
        base, base_lse = attention_reference_varlen(q, k, v, cu, cu, causal=True, upcast=False)
        assert_close_to_reference(out.cpu(), ref, base, FORWARD_FACTOR, "out")
        assert_close_to_reference(lse.cpu(), ref_lse, base_lse, FORWARD_FACTOR, "lse")
        return f"sequences {list(lengths)}: out, lse within tolerance"

    return run


def itertools_accumulate(values):
    import itertools

    return list(itertools.accumulate(values))


def _served(calls, op: str) -> None:
    from mfa_hf import trace

    served = trace.served_by(calls)
    if served[("metal", op)] < 1:
        raise AssertionError(f"expected the metal backend to serve {op}, got {dict(served)}")


# ---------------------------------------------------------------------------------------------
# KV-cache decode (flash_attn_with_kvcache): appended tokens quantized on write, then attention.

DECODE_CAPACITY = 96


def decode(case, lengths: tuple[int, ...] = (0, 29, 70)) -> Callable[[str], str]:
    def run(device: str) -> str:
        from mfa_hf import trace
        from mfa_hf.testing_kvcache import (assert_matches_reference_over_cache, caches_on, make_decode_inputs,
                                            run_kvcache)

        inputs = caches_on(make_decode_inputs(case, lengths, DECODE_CAPACITY, seed=5), device)
        with trace.capture() as calls:
            out, lse = run_kvcache(case, inputs, device)
        _served(calls, "decode")
        assert_matches_reference_over_cache(case, inputs, out, lse)
        return f"cache lengths {list(lengths)} + {case.lq} appended: out, lse within tolerance"

    return run


def decode_empty_cache(dtype: torch.dtype) -> Callable[[str], str]:
    """No cached key and none appended: every row sees nothing, so out is 0 and LSE -inf (no NaN)."""

    def run(device: str) -> str:
        import mfa_hf
        from mfa_hf import trace

        g = torch.Generator().manual_seed(9)
        q = torch.randn(2, 1, 4, 64, generator=g).to(dtype).to(device)
        k_cache = torch.randn(2, 32, 2, 64, generator=g).to(dtype).to(device)
        v_cache = torch.randn(2, 32, 2, 64, generator=g).to(dtype).to(device)
        lengths = torch.zeros(2, dtype=torch.int32, device=device)
        with trace.capture() as calls:
            out, lse = mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, return_lse=True)
        _served(calls, "decode")
        out, lse = out.cpu().double(), lse.cpu().double()
        if torch.isnan(out).any() or torch.isnan(lse).any():
            raise AssertionError("NaN in the output or LSE of rows that see no key")
        if not bool((out == 0).all()):
            raise AssertionError(f"out: expected 0 for rows that see no key, got max |out| {float(out.abs().max()):.3e}")
        if not bool((lse == -math.inf).all()):
            raise AssertionError("lse: expected -inf for rows that see no key")
        return "out == 0, lse == -inf, no NaN"

    return run


# ---------------------------------------------------------------------------------------------


def _checks() -> list[Check]:
    from mfa_hf.testing import Case
    from mfa_hf.testing_kvcache import DecodeCase

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    checks = [
        Check(f"causal GQA 4/2 heads, D=64 ({short(dtype)})", "forward+backward", dtype,
              dense(Case(dtype, 2, 37, 50, 4, 2, 64, 64, causal=True)))
        for dtype in (f16, bf16, f32)
    ]
    checks += [
        Check("left-padded bool mask (first key blocks masked), causal: padded rows have no visible key -> 0",
              "forward+backward", f16,
              dense(Case(f16, 2, 70, 70, 4, 2, 64, 64, causal=True, mask="bool"), mask=left_padded_mask(2, 70, 40))),
        Check("additive mask with a fully masked row (output 0, LSE -inf) and its gradient", "forward+backward",
              bf16, dense(Case(bf16, 2, 37, 50, 4, 2, 64, 64, mask="additive"))),
        Check("causal Lq > Lk: the first rows have no visible key -> 0, not NaN", "forward+backward", f32,
              dense(Case(f32, 2, 50, 29, 4, 4, 64, 64, causal=True))),
        Check("softcap 5.0", "forward+backward", f16, dense(Case(f16, 2, 37, 50, 4, 2, 64, 64, softcap=5.0))),
        Check("attention sinks", "forward+backward", bf16, dense(Case(bf16, 2, 37, 50, 4, 2, 64, 64, sinks=True))),
        Check("ALiBi, sliding window (12, 4)", "forward+backward", f16,
              dense(Case(f16, 2, 37, 50, 4, 2, 64, 64, window=(12, 4), alibi=True))),
        Check("MLA head dims 192/128, causal", "forward+backward", bf16,
              dense(Case(bf16, 1, 33, 40, 2, 1, 192, 128, causal=True))),
        Check("head dim 256, MQA", "forward", f16, dense(Case(f16, 1, 33, 40, 4, 1, 256, 256), gradients=False)),
        Check("odd head dim 100", "forward", f32, dense(Case(f32, 1, 33, 40, 2, 2, 100, 100), gradients=False)),
        Check("varlen, causal, one empty sequence", "varlen", f16, varlen(f16, (30, 0, 47), 64)),
        Check("decode, plain cache, GQA 4/1", "decode", f16, decode(DecodeCase(None, 1, f16, (4, 1), 64))),
        Check("decode, int8 cache, sinks", "decode", bf16, decode(DecodeCase("int8", 1, bf16, (4, 2), 64, sinks=True))),
        Check("decode, fp8_e4m3 cache, softcap, split-K 3", "decode", f16,
              decode(DecodeCase("fp8_e4m3", 1, f16, (4, 2), 64, softcap=4.0, num_splits=3))),
        Check("decode, fp8_e5m2 cache, ALiBi, 4 query tokens", "decode", f32,
              decode(DecodeCase("fp8_e5m2", 4, f32, (4, 2), 64, alibi=True))),
        Check("decode, nf4 cache, D=128, sliding window", "decode", bf16,
              decode(DecodeCase("nf4", 1, bf16, (4, 2), 128, window=(20, -1)))),
        Check("decode over an empty cache, first token appended", "decode", f16,
              decode(DecodeCase(None, 1, f16, (4, 2), 64), lengths=(0, 0, 0))),
        Check("decode over an empty cache, nothing appended: 0, LSE -inf", "decode", f16, decode_empty_cache(f16)),
    ]
    return checks


CHECKS = _checks()
