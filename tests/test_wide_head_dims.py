"""Head dims wider than the compiled kernels are built for (Gemma 4's 512-wide global layers): served by the torch
backend on every device, exactly, never refused at the API (the first forward of a Gemma 4 model raised
"expected a head dim in 1..256").

The metal and triton backends say why they pass (the dispatcher then picks torch, and the trace names it);
forcing them raises BackendUnavailable with that reason. Forward, backward and decode (plain and quantized caches)
against the float64 reference.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mfa_hf
from mfa_hf import dispatch, trace
from mfa_hf.kernels.contract import KERNEL_MAX_HEAD_DIM
from mfa_hf.kernels.reference import attention_reference
from mfa_hf.kvcache import append_kv
from mfa_hf.ops import describe
from mfa_hf.testing import Case, check_against_reference

WIDE_CASES = [
    Case(dim=512, dim_v=512, heads_q=4, heads_kv=2, causal=True, lq=21, lk=30),
    Case(dim=300, dim_v=300, heads_q=4, heads_kv=1, lq=30, lk=21, window=(5, 3)),
    Case(dim=512, dim_v=257, heads_q=2, heads_kv=2, lq=17, lk=17, mask="additive", sinks=True),
    Case(dtype=torch.bfloat16, dim=512, dim_v=512, heads_q=4, heads_kv=2, causal=True, lq=19, lk=19, softcap=5.0),
]


@pytest.mark.parametrize("case", WIDE_CASES, ids=lambda c: c.id)
def test_torch_backend_serves_wide_heads_exactly(monkeypatch, case):
    monkeypatch.setenv("MFA_BACKEND", "torch")
    check_against_reference(case, backend="torch")


def test_default_route_serves_a_wide_causal_call(monkeypatch):
    monkeypatch.delenv("MFA_BACKEND", raising=False)
    check_against_reference(Case(dim=512, dim_v=512, heads_q=4, heads_kv=2, causal=True, lq=24, lk=24))


def _wide_problem(device_type: str, dim: int = 512, dim_v: int = 512):
    q = torch.randn(1, 8, 4, dim)
    k = torch.randn(1, 8, 2, dim)
    v = torch.randn(1, 8, 2, dim_v)
    from mfa_hf.kernels.contract import AttentionCall, Options

    problem = describe(AttentionCall(q, k, v, Options(dim ** -0.5, -1, 0)))
    return dataclasses.replace(problem, device_type=device_type)


# Where each compiled backend serves here: metal on CPU tensors under its emulator, triton on cuda ones.
SERVED_ON = {"metal": "cpu", "triton": "cuda"}


@pytest.fixture
def metal_emulated(monkeypatch):
    monkeypatch.setenv("MFA_METAL_EMULATOR", "1")
    monkeypatch.delenv("MFA_BACKEND", raising=False)


@pytest.mark.parametrize("name", sorted(SERVED_ON))
@pytest.mark.parametrize("dims", [(KERNEL_MAX_HEAD_DIM + 1, 64), (64, 512), (512, 512)])
def test_compiled_kernels_pass_wide_heads_to_the_torch_backend(metal_emulated, name, dims):
    ok, reason = dispatch.backend(name).supports(_wide_problem(SERVED_ON[name], *dims))
    assert not ok
    assert reason == (f"head dims ({dims[0]}, {dims[1]}): the {'Metal' if name == 'metal' else name} kernels go up "
                      f"to 256 (the torch backend serves larger ones)")
    assert dispatch.backend(name).supports(_wide_problem(SERVED_ON[name], 256, 256))[0]


@pytest.mark.parametrize("name", sorted(SERVED_ON))
def test_auto_selects_the_torch_backend_for_wide_heads_only(metal_emulated, name):
    assert dispatch.select(_wide_problem(SERVED_ON[name], 256, 256)).name == name
    assert dispatch.select(_wide_problem(SERVED_ON[name])).name == "torch"


@pytest.mark.parametrize("forced", ["metal", "triton"])
def test_forcing_a_compiled_backend_on_wide_heads_names_the_limit(monkeypatch, forced):
    monkeypatch.setenv("MFA_BACKEND", forced)
    q, k, v = (torch.randn(1, 6, 2, 512) for _ in range(3))
    with pytest.raises(mfa_hf.BackendUnavailable, match=f"MFA_BACKEND={forced} cannot serve this call"):
        mfa_hf.flash_attn_func(q, k, v, causal=True)


@pytest.mark.parametrize("fmt", ["none", "int8", "nf4"])
def test_decode_over_a_wide_cache(fmt):
    """flash_attn_with_kvcache with 512-wide heads, a plain and quantized cache, appending one token."""
    generator = torch.Generator().manual_seed(3)
    batch, heads_q, heads_kv, dim, capacity, length = 2, 4, 2, 512, 40, 29
    q = torch.randn(batch, 1, heads_q, dim, generator=generator)
    k_all, v_all = (torch.randn(batch, capacity, heads_kv, dim, generator=generator) for _ in range(2))
    new_k, new_v = (torch.randn(batch, 1, heads_kv, dim, generator=generator) for _ in range(2))
    if fmt == "none":
        k_cache, v_cache = k_all.clone(), v_all.clone()
    else:
        k_cache = mfa_hf.allocate_kv_cache(batch, capacity, heads_kv, dim, fmt)
        v_cache = mfa_hf.allocate_kv_cache(batch, capacity, heads_kv, dim, fmt)
        append_kv(k_cache, v_cache, k_all[:, :length], v_all[:, :length], 0)
    lengths = torch.full((batch,), length, dtype=torch.int32)
    with trace.capture() as calls:
        out = mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, k=new_k, v=new_v, cache_seqlens=lengths, causal=True)
    assert sum(trace.served_by(calls).values()) >= 1
    stored_k = k_cache[:, :length + 1] if fmt == "none" else k_cache.dequantize()[:, :length + 1]
    stored_v = v_cache[:, :length + 1] if fmt == "none" else v_cache.dequantize()[:, :length + 1]
    expected, _ = attention_reference(q.double(), stored_k.double(), stored_v.double(), causal=True)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-4)
