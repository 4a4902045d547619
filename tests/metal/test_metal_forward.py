"""The metal backend's forward against the float64 reference (DESIGN.md rule), every case under two
schedules with bitwise-equal outputs.

Runs unchanged on a Mac (`python -m pytest tests/metal` uses mps) and on Linux CI through the MSL
emulator (CPU tensors, MFA_METAL_EMULATOR=1 set by the fixtures).
"""

import math

import pytest
import torch

import mfa_hf
from mfa_hf.kernels.metal import loader
from mfa_hf.kernels.reference import attention_reference
from mfa_hf.testing import (
    FORWARD_FACTOR,
    GRADIENT_FACTOR,
    Case,
    assert_close_to_reference,
    check_against_reference,
    core_cases,
    full_cases,
    make_inputs,
    run_public_api,
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_case(case: Case, runtime, two_schedules, seed: int = 0, gradients: bool = False):
    """The reference check on the first schedule; then the same inputs again under the second
    (outside the reference check, whose trace expects exactly one forward)."""
    first = []

    def run(case, inputs, **extra):
        first.append(run_public_api(case, inputs, **extra))
        return first[-1]

    check_against_reference(case, run, backend="metal", seed=seed, gradients=gradients, device=runtime.device)
    inputs = make_inputs(case, device=runtime.device, seed=seed)
    two_schedules.again(lambda: run_public_api(case, inputs), first[0])


@pytest.mark.parametrize("case", core_cases(), ids=lambda c: c.id)
def test_feature_matrix(case, metal_backend, two_schedules):
    check_case(case, metal_backend, two_schedules)


@pytest.mark.slow
@pytest.mark.parametrize("case", full_cases(), ids=lambda c: c.id)
def test_full_feature_matrix(case, metal_backend, two_schedules):
    check_case(case, metal_backend, two_schedules, seed=7)


# Every listed head dim per dtype, with D_v != D_qk beside it; causal, lengths crossing blocks.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [32, 64, 80, 96, 128, 160, 192, 256])
def test_head_dims(dim, dtype, metal_backend, two_schedules):
    case = Case(dtype=dtype, batch=1, lq=33, lk=40, heads_q=2, heads_kv=1, dim=dim, dim_v=dim, causal=True)
    check_case(case, metal_backend, two_schedules)


@pytest.mark.parametrize("dim, dim_v", [(64, 32), (32, 128), (128, 256), (256, 64), (96, 80)])
def test_value_dim_differs(dim, dim_v, metal_backend, two_schedules):
    case = Case(dtype=torch.float16, batch=1, lq=21, lk=47, heads_q=2, heads_kv=2, dim=dim, dim_v=dim_v, sinks=True)
    check_case(case, metal_backend, two_schedules)


# Lengths at and around the block sizes (BQ 32/16, BK 32/16/8), one row or one key, both orders.
@pytest.mark.parametrize("lq, lk", [(1, 70), (70, 1), (32, 32), (33, 65), (64, 17), (16, 8), (1, 1)])
@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (False, (9, 2))])
def test_block_boundaries(lq, lk, causal, window, metal_backend, two_schedules):
    case = Case(dtype=torch.bfloat16, batch=1, lq=lq, lk=lk, heads_q=2, heads_kv=1, dim=64, dim_v=64,
                causal=causal, window=window, alibi=True)
    check_case(case, metal_backend, two_schedules)


def test_bhsd_layout_reads_through_strides(metal_backend, two_schedules):
    """(B, H, S, D) tensors passed as their (B, S, H, D) transposes: no copy needed."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, n, 24, generator=g).to(metal_backend.device) for n in (19, 27, 27))
    out, lse = two_schedules(lambda: mfa_hf.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           causal=True, return_lse=True))
    ref, ref_lse = attention_reference(*(t.transpose(1, 2).cpu().double() for t in (q, k, v)), causal=True)
    base, base_lse = attention_reference(*(t.transpose(1, 2).cpu() for t in (q, k, v)), causal=True, upcast=False)
    assert_close_to_reference(out.cpu(), ref, base)
    assert_close_to_reference(lse.cpu(), ref_lse, base_lse)


def _varlen_inputs(dtype, device, lengths_q, lengths_k, hq, hkv, dim, dim_v, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lengths_q), sum(lengths_k)
    q = torch.randn(tq, hq, dim, generator=g).to(dtype)
    k = torch.randn(tk, hkv, dim, generator=g).to(dtype)
    v = torch.randn(tk, hkv, dim_v, generator=g).to(dtype)
    cu_q = torch.tensor([0] + list(torch.tensor(lengths_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lengths_k).cumsum(0)), dtype=torch.int32)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", [
    dict(causal=True),
    dict(window_size=(7, 3), softcap=4.0),
    dict(causal=True, alibi=True, sinks=True),
], ids=["causal", "window-softcap", "causal-alibi-sinks"])
def test_varlen(dtype, options, metal_backend, two_schedules):
    """Packed sequences with Lq != Lk both ways, an empty query sequence and an empty key sequence."""
    options = dict(options)
    lengths_q, lengths_k = [5, 40, 0, 17, 3], [30, 9, 6, 17, 0]
    device = metal_backend.device
    q, k, v, cu_q, cu_k = _varlen_inputs(dtype, "cpu", lengths_q, lengths_k, 4, 2, 40, 24)
    g = torch.Generator().manual_seed(1)
    slopes = torch.rand(len(lengths_q), 4, generator=g) * 0.5 if options.pop("alibi", False) else None
    sinks = torch.randn(4, generator=g) if options.pop("sinks", False) else None
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    out, lse = two_schedules(lambda: mfa_hf.flash_attn_varlen_func(
        on(q), on(k), on(v), on(cu_q), on(cu_k), max(lengths_q), max(lengths_k), alibi_slopes=on(slopes),
        sinks=on(sinks), return_lse=True, **options))
    factor = GRADIENT_FACTOR if options.get("softcap", 0) > 0 else FORWARD_FACTOR
    for b in range(len(lengths_q)):
        rows, keys = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        seq_slopes = None if slopes is None else slopes[b]
        args = (q[None, rows], k[None, keys], v[None, keys])
        ref, ref_lse = attention_reference(*(t.double() for t in args), alibi_slopes=seq_slopes, sinks=sinks, **options)
        base, base_lse = attention_reference(*args, alibi_slopes=seq_slopes, sinks=sinks, upcast=False, **options)
        assert_close_to_reference(out.cpu()[None, rows], ref, base, factor, f"out[{b}]")
        assert_close_to_reference(lse.cpu()[None, :, rows], ref_lse, base_lse, factor, f"lse[{b}]")


def _skipped_key_rows(lq: int, lk: int, left: int, config) -> list[int]:
    """Query rows whose threadgroup's first visible key is past the first key block."""
    rows = []
    for block0 in range(0, lq, config.query_block):
        if block0 + lk - lq - left >= config.key_block:
            rows += range(block0, min(block0 + config.query_block, lq))
    return rows


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_window_skips_the_key_blocks_it_empties(dtype, metal_backend, two_schedules):
    """NaN in the first key block: rows whose threadgroup never visits that block stay finite.
    Without block skipping, P = 0 times V = NaN inside the product would make them NaN."""
    n, left, dim = 96, 8, 64
    config = loader.block_config(dtype, dim, dim)
    rows = _skipped_key_rows(n, n, left, config)
    assert rows, "the shape should leave whole key blocks outside some threadgroups' windows"
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, n, 2, dim, generator=g).to(dtype) for _ in range(3))
    v_nan = v.clone()
    v_nan[:, : config.key_block] = float("nan")
    device = metal_backend.device
    out = two_schedules(lambda: [mfa_hf.flash_attn_func(q.to(device), k.to(device), v_nan.to(device),
                                                        causal=True, window_size=(left, -1))])[0].cpu()
    ref, _ = attention_reference(q.double(), k.double(), v.double(), causal=True, window_size=(left, -1))
    base, _ = attention_reference(q, k, v, causal=True, window_size=(left, -1), upcast=False)
    assert_close_to_reference(out[:, rows], ref[:, rows], base[:, rows])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_causal_skips_key_blocks_above_the_diagonal(dtype, metal_backend, two_schedules):
    """NaN in the last key blocks: the first query block, which causal masking keeps off them, stays finite."""
    n, dim = 96, 32
    config = loader.block_config(dtype, dim, dim)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, 2, dim, generator=g).to(dtype) for _ in range(3))
    v_nan = v.clone()
    v_nan[:, config.query_block:] = float("nan")
    rows = slice(0, config.query_block)
    device = metal_backend.device
    out = two_schedules(lambda: [mfa_hf.flash_attn_func(q.to(device), k.to(device), v_nan.to(device), causal=True)])[0]
    ref, _ = attention_reference(q.double(), k.double(), v.double(), causal=True)
    base, _ = attention_reference(q, k, v, causal=True, upcast=False)
    assert_close_to_reference(out.cpu()[:, rows], ref[:, rows], base[:, rows])


def test_fully_masked_rows_give_zero_and_minus_inf(metal_backend, two_schedules):
    device = metal_backend.device
    q, k, v = (torch.randn(1, n, 2, 16).to(device) for n in (6, 3, 3))
    out, lse = two_schedules(lambda: mfa_hf.flash_attn_func(q, k, v, causal=True, return_lse=True))
    out, lse = out.cpu(), lse.cpu()
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))  # Lq > Lk: rows 0..2 see no key
    assert bool((lse[:, :, :3] == -math.inf).all()) and bool(torch.isfinite(lse[:, :, 3:]).all())


@pytest.mark.parametrize("shape, kind", [((1, 1, 1, 45), "bool"), ((2, 1, 1, 45), "additive"),
                                         ((1, 4, 30, 45), "additive"), ((30, 45), "bool")])
def test_broadcast_masks(shape, kind, metal_backend, two_schedules):
    """Masks broadcast along any dims (stride 0 after expand); an additive float32 mask with fp16 inputs."""
    g = torch.Generator().manual_seed(5)
    device = metal_backend.device
    q, k, v = (torch.randn(2, n, 4, 32, generator=g).to(torch.float16) for n in (30, 45, 45))
    if kind == "bool":
        mask = torch.rand(shape, generator=g) > 0.4
    else:
        mask = torch.randn(shape, generator=g).masked_fill(torch.rand(shape, generator=g) > 0.7, -math.inf)
    out, lse = two_schedules(lambda: mfa_hf.flash_attn_func(q.to(device), k.to(device), v.to(device),
                                                           attn_mask=mask.to(device), return_lse=True))
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), attn_mask=mask if kind == "bool" else mask.double())
    base, base_lse = attention_reference(q, k, v, attn_mask=mask, upcast=False)
    assert_close_to_reference(out.cpu(), ref, base)
    assert_close_to_reference(lse.cpu(), ref_lse, base_lse)


def test_varlen_int64_offsets(metal_backend, two_schedules):
    lengths_q, lengths_k = [3, 33, 0], [40, 1, 5]
    q, k, v, cu_q, cu_k = _varlen_inputs(torch.float32, "cpu", lengths_q, lengths_k, 2, 1, 16, 16)
    device = metal_backend.device
    out, lse = two_schedules(lambda: mfa_hf.flash_attn_varlen_func(
        q.to(device), k.to(device), v.to(device), cu_q.long().to(device), cu_k.long().to(device),
        max(lengths_q), max(lengths_k), causal=True, return_lse=True))
    for b in range(len(lengths_q)):
        rows, keys = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        args = (q[None, rows], k[None, keys], v[None, keys])
        ref, ref_lse = attention_reference(*(t.double() for t in args), causal=True)
        base, base_lse = attention_reference(*args, causal=True, upcast=False)
        assert_close_to_reference(out.cpu()[None, rows], ref, base, name=f"out[{b}]")
        assert_close_to_reference(lse.cpu()[None, :, rows], ref_lse, base_lse, name=f"lse[{b}]")


# The general path (MFA_LONG_POSITIONS: positions on `long`) that serves problems past
# forward.POSITION_LIMIT: the same cases through it, forced by a limit of 0.
LONG_POSITION_CASES = [c for c in core_cases() if c.dtype == torch.float16 and
                       any(f in c.id for f in ("w5_3-alibi-mask_bool", "causal-w6_-1-softcap-sinks-alibi-mask_additive",
                                               "-d40-40-mask_additive", "-d111-111-causal-mask_bool"))]


@pytest.mark.parametrize("case", LONG_POSITION_CASES, ids=lambda c: c.id)
def test_long_positions_path(case, metal_backend, two_schedules, monkeypatch):
    from mfa_hf.kernels.metal import forward

    monkeypatch.setattr(forward, "POSITION_LIMIT", 0)
    check_case(case, metal_backend, two_schedules)
    assert any(getattr(v, "long_positions", False) for v in loader.cached_variants())


def test_long_positions_path_varlen(metal_backend, two_schedules, monkeypatch):
    from mfa_hf.kernels.metal import forward

    monkeypatch.setattr(forward, "POSITION_LIMIT", 0)
    test_varlen(torch.float16, {"window_size": (4, 1), "alibi": True}, metal_backend, two_schedules)
