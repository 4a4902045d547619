"""Argument checks under torch.compile with dynamic shapes (fullgraph): a tensor held fixed beside a q whose
sizes are symbolic must pass the same checks as in eager code.

Dynamo answers `5 in (1, s0)` False (it matches a SymInt in a tuple by identity, not by value), so a check
written that way refused a valid static mask once q's length became dynamic. Every size check goes through
problem.fits_dim / problem.shape_is; each case here compiles one entry point with a static helper tensor whose
size equals a dynamic size of q, and compares with eager code."""

from __future__ import annotations

import pytest
import torch

import mfa_hf
from mfa_hf import problem, quant
from mfa_hf.integrations.flash_attn_shim import interface as shim
from mfa_hf.integrations.flash_attn_shim import rotary


def _same(fn, *args, dynamic_dim: int = 1):
    """fn compiled with dim `dynamic_dim` of its first argument symbolic (a sequence length, as dynamo marks one
    that changed between calls) against fn in eager code."""
    torch._dynamo.reset()
    first = args[0].clone()
    torch._dynamo.maybe_mark_dynamic(first, dynamic_dim)
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(first, *args[1:]), fn(*args), equal_nan=True)


def test_the_helpers_compare_by_value():
    assert problem.fits_dim(1, 5) and problem.fits_dim(5, 5) and not problem.fits_dim(4, 5)
    assert problem.shape_is((3,), (3,), ()) and problem.shape_is((), (3,), ()) and not problem.shape_is((1, 3), (3,))

    def check(x):
        n = x.shape[0]
        return x * (2 if problem.fits_dim(5, n) and problem.shape_is((n, 5), (5, 5)) else 3)

    _same(check, torch.ones(5), dynamic_dim=0)


g = torch.Generator().manual_seed(0)
Q, K, V = (torch.randn(2, 5, 4, 16, generator=g) for _ in range(3))


@pytest.mark.parametrize("mask_shape", [(2, 1, 5, 5), (1, 4, 5, 5), (5, 5), (2, 4, 1, 5)])
def test_static_mask_beside_a_dynamic_q(mask_shape):
    mask = torch.rand(mask_shape, generator=g) > 0.3
    _same(lambda q, k, v: mfa_hf.flash_attn_func(q, k, v, attn_mask=mask), Q, K, V)
    _same(lambda q, k, v: mfa_hf.flash_attn_func(q, k, v, attn_mask=mask), Q, K, V, dynamic_dim=0)


@pytest.mark.parametrize("slopes_shape", [(4,), (2, 4)])
def test_static_alibi_slopes_beside_a_dynamic_q(slopes_shape):
    slopes = torch.rand(slopes_shape, generator=g)
    _same(lambda q, k, v: mfa_hf.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes), Q, K, V)


def test_static_scales_beside_dynamic_values():
    scales = torch.rand(2, 5, 4, 1, generator=g) + 0.5  # per token: (B, S, H, 1)
    _same(lambda x: quant.quantize_kv(x, "int8", scales=scales).dequantize(), K)


def test_static_cache_lengths_beside_a_dynamic_cache():
    lengths = torch.tensor([3, 5], dtype=torch.int32)
    _same(lambda q, kc, vc: shim.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lengths, causal=True),
          Q[:, :1], K, V)


def test_static_rotary_offsets_beside_a_dynamic_x():
    cos, sin = torch.rand(16, 4, generator=g), torch.rand(16, 4, generator=g)
    offsets = torch.tensor([0, 3], dtype=torch.int32)
    _same(lambda x: rotary.apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets), Q)


def test_first_call_of_a_process_inside_fullgraph_compile(tmp_path):
    """The route table is read at import: a first call traced by dynamo cannot stat its file."""
    import subprocess
    import sys

    code = ("import torch, mfa_hf\n"
            "q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))\n"
            "f = torch.compile(lambda q, k, v: mfa_hf.flash_attn_func(q, k, v, causal=True), fullgraph=True, "
            "backend='eager')\n"
            "torch.testing.assert_close(f(q, k, v), mfa_hf.flash_attn_func(q, k, v, causal=True))\n")
    env = {**__import__("os").environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("MFA_ROUTE_TABLE", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("keyword", ["softcap", "softmax_scale"])
def test_float_arguments_that_become_symbolic(keyword):
    """A float argument that changes between calls (or any float under dynamic=True, the defaults included) reaches
    the checks as a SymFloat, which math.isfinite cannot trace: fullgraph compile failed on the second value
    ('torch.* op returned non-Tensor ... isfinite'). Three values, one compiled function, each equal to eager."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 2, 16, generator=g) for _ in range(3))

    def fn(q, k, v, value):
        return mfa_hf.flash_attn_func(q, k, v, causal=True, **{keyword: value})

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    for value in (2.0, 3.0, 0.5):
        torch.testing.assert_close(compiled(q, k, v, value), fn(q, k, v, value))
    dynamic = torch.compile(lambda q, k, v: mfa_hf.flash_attn_func(q, k, v, causal=True), dynamic=True,
                            fullgraph=True, backend="eager")
    for length in (5, 9):
        torch.testing.assert_close(dynamic(q[:, :length], k, v), mfa_hf.flash_attn_func(q[:, :length], k, v, causal=True))


def test_the_finite_check_traces():
    from mfa_hf import scalars

    assert scalars.is_finite(1.5) and scalars.is_finite(-0.0) and scalars.is_finite(0)
    assert not any(scalars.is_finite(x) for x in (float("inf"), -float("inf"), float("nan")))
