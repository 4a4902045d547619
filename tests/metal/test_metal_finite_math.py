"""The cases that inf/NaN-based kernels get wrong when compiled with fast math, in both math modes.

With PYTORCH_MPS_FAST_MATH=1 Apple's compiler may assume that no value is infinite or NaN (the
emulator compiles such kernels with clang's -ffinite-math-only). Kernels that used -inf as "no key
seen yet" then gave NaN for rows that see no key, for rows whose first key block is masked (the
ordinary left-padded mask) and for decode over an empty cache. Every test here is marked
`finite_math`, so its fast-math twin (tests/metal/conftest.py) runs in the default CI run too.
"""

import math

import pytest
import torch

import mfa_hf
from mfa_hf import trace
from mfa_hf.kernels.reference import attention_reference
from mfa_hf.testing import FORWARD_FACTOR, GRADIENT_FACTOR, Case, assert_close_to_reference, check_against_reference

pytestmark = pytest.mark.finite_math

DTYPES = (torch.float16, torch.float32)


def _run(case, inputs, **extra):
    return mfa_hf.flash_attn_func(inputs["q"], inputs["k"], inputs["v"], attn_mask=inputs["attn_mask"],
                                  alibi_slopes=inputs["alibi_slopes"], sinks=inputs["sinks"], return_lse=True,
                                  **case.options(), **extra)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("features", [{}, {"sinks": True}, {"window": (3, 0)}, {"mask": "bool"},
                                      {"mask": "additive"}], ids=lambda f: "-".join(map(str, f)) or "plain")
def test_rows_that_see_no_key(dtype, features, metal_backend):
    """Lq > Lk with causal alignment at the bottom right: the first 30 rows see no key (0, LSE -inf,
    zero gradients), the masks add fully masked rows of their own."""
    features = dict(features)
    window = features.pop("window", (-1, -1))
    case = Case(dtype=dtype, batch=2, lq=40, lk=10, heads_q=2, heads_kv=1, dim=32, dim_v=32,
                causal=window == (-1, -1), window=window, **features)
    check_against_reference(case, _run, backend="metal", device=metal_backend.device, gradients=True)


def _left_padded(kind: str, dtype, batch: int, lk: int, pad: tuple[int, ...], device):
    """A (B, 1, 1, Lk) padding mask: the first pad[b] keys of sequence b are padding."""
    keep = torch.arange(lk)[None, :] >= torch.tensor(pad)[:, None]
    keep = keep[:, None, None, :]
    if kind == "bool":
        return keep.to(device)
    fill = -math.inf if kind == "-inf" else torch.finfo(dtype).min  # transformers fills with finfo.min
    return torch.zeros(keep.shape).masked_fill(~keep, fill).to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "-inf", "finfo.min"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_left_padded_mask(dtype, kind, causal, metal_backend):
    """Left padding masks whole key blocks before the first visible key (40 keys: every block size
    of the forward), and one sequence is all padding. Forward and gradients against float64."""
    device, g = metal_backend.device, torch.Generator().manual_seed(3)
    batch, lq, lk, heads, dim = 3, 24, 72, 2, 32
    q, k, v = (torch.randn(batch, length, heads, dim, generator=g).to(dtype)
               for length in (lq, lk, lk))
    # One sequence is all padding, except with float32 finfo.min: a row that sees only finfo.min
    # entries has a float32 LSE that absorbs log(Lk), and every backend's gradients of such a row
    # are off (a known limit: the fix saves one more per-row statistic). Its forward is covered by
    # the other dtypes and kinds; here no row of that sequence sees only padding.
    pads = (40, 0, 20) if (kind, dtype) == ("finfo.min", torch.float32) else (40, 0, lk)
    mask = _left_padded(kind, dtype, batch, lk, pads, "cpu")
    leaves = [t.clone().to(device).requires_grad_(True) for t in (q, k, v)]
    with trace.capture() as calls:
        out, lse = mfa_hf.flash_attn_func(*leaves, attn_mask=mask.to(device), causal=causal, return_lse=True)
    assert trace.served_by(calls)[("metal", "fwd")] == 1
    grad = torch.randn(out.shape, generator=g).to(dtype)
    ours = torch.autograd.grad(out, leaves, grad.to(device))

    def reference(upcast):
        args = [t.detach().to(torch.float64 if upcast else dtype).requires_grad_(True) for t in (q, k, v)]
        bias = mask if kind == "bool" else mask.to(torch.float64 if upcast else dtype)
        r_out, r_lse = attention_reference(*args, attn_mask=bias, causal=causal, upcast=upcast)
        r_grads = torch.autograd.grad(r_out, args, grad.to(r_out.dtype))
        return r_out, r_lse, r_grads

    ref, ref_lse, ref_grads = reference(True)
    base, base_lse, base_grads = reference(False)
    assert not bool(torch.isnan(out.cpu()).any()), "NaN in the output"
    assert_close_to_reference(out.cpu(), ref, base, FORWARD_FACTOR, "out")
    assert_close_to_reference(lse.cpu(), ref_lse, base_lse, FORWARD_FACTOR, "lse")
    for name, mine, want, baseline in zip("qkv", ours, ref_grads, base_grads):
        assert_close_to_reference(mine.cpu(), want, baseline, GRADIENT_FACTOR, f"d{name}")


@pytest.mark.parametrize("splits", [1, 3], ids=["vector", "split"])
@pytest.mark.parametrize("sinks", [False, True], ids=["nosink", "sinks"])
@pytest.mark.parametrize("lq", [1, 3])
def test_decode_over_an_empty_cache(splits, sinks, lq, metal_backend):
    """Sequence 0 has an empty cache (0, LSE -inf; with sinks: 0 and LSE = the sink), sequence 1 a
    short one, sequence 2 a causal window that leaves its first query rows nothing."""
    device, g = metal_backend.device, torch.Generator().manual_seed(5)
    q = torch.randn(3, lq, 4, 32, generator=g)
    cache_k, cache_v = torch.randn(2, 3, 64, 2, 32, generator=g).unbind(0)
    lengths = torch.tensor([0, 5, 2], dtype=torch.int32)
    sink = torch.randn(4, generator=g) if sinks else None
    with trace.capture() as calls:
        out, lse = mfa_hf.flash_attn_with_kvcache(
            q.to(device), cache_k.to(device), cache_v.to(device), cache_seqlens=lengths.to(device), causal=True,
            return_lse=True, num_splits=splits, sinks=None if sink is None else sink.to(device))
    assert trace.served_by(calls)[("metal", "decode")] == 1
    for b, length in enumerate(lengths.tolist()):
        ref, ref_lse = attention_reference(q[b:b + 1].double(), cache_k[b:b + 1, :length].double(),
                                           cache_v[b:b + 1, :length].double(), causal=True, sinks=sink)
        assert_close_to_reference(out[b:b + 1].cpu(), ref, ref.float(), FORWARD_FACTOR, f"out[{b}]")
        assert_close_to_reference(lse[b:b + 1].cpu(), ref_lse, ref_lse.float(), FORWARD_FACTOR, f"lse[{b}]")


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_append_keeps_nan_codes(fmt, metal):
    """A NaN in the new tokens is stored as the format's NaN code, as mfa_hf.quant encodes it, also
    when isnan() could be compiled away (the kernel tests the stored bits)."""
    from mfa_hf import kvcache
    from mfa_hf.kernels.metal.append import append

    g = torch.Generator().manual_seed(11)
    content = torch.randn(2, 8, 1, 32, generator=g)
    new = torch.randn(2, 2, 1, 32, generator=g)
    new[0, 1, 0, 5] = float("nan")
    new[1, 0, 0, 0] = float("-nan")
    lengths = torch.tensor([1, 4], dtype=torch.int32)
    want = mfa_hf.quantize_kv(content, fmt, granularity="head")
    ours = mfa_hf.quantize_kv(content, fmt, granularity="head")
    kvcache._append_all(want, want, new, new, lengths, None)
    on_device = mfa_hf.QuantizedKV(ours.codes.to(metal.device), ours.scales.to(metal.device), ours.format,
                                   ours.group_size, ours.dtype)
    append(on_device, new.to(metal.device), lengths.to(metal.device))
    assert torch.equal(on_device.codes.cpu(), want.codes), int((on_device.codes.cpu() != want.codes).sum())


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "nf4"])
def test_append_gives_a_nan_or_inf_group_a_nan_scale(fmt, metal):
    """Per-token scales: a group holding NaN or inf gets a NaN scale, as mfa_hf.quant does (the whole group
    dequantizes to NaN; int8 and nf4 have no NaN code), found from the stored bits so fast math cannot drop it.
    The other groups are the torch append's, code for code."""
    from mfa_hf import kvcache
    from mfa_hf.kernels.metal.append import append

    g = torch.Generator().manual_seed(12)
    group = 32 if fmt == "nf4" else None
    new = torch.randn(2, 2, 1, 64, generator=g)
    new[0, 1, 0, 5] = float("nan")
    new[1, 0, 0, 40] = float("-inf")
    lengths = torch.tensor([1, 4], dtype=torch.int32)
    want, ours = (mfa_hf.allocate_kv_cache(2, 8, 1, 64, fmt, group_size=group) for _ in range(2))
    kvcache._append_all(want, want, new, new, lengths, None)
    on_device = mfa_hf.QuantizedKV(ours.codes.to(metal.device), ours.scales.to(metal.device), ours.format,
                                   ours.group_size, ours.dtype)
    append(on_device, new.to(metal.device), lengths.to(metal.device))
    got = mfa_hf.QuantizedKV(on_device.codes.cpu(), on_device.scales.cpu(), ours.format, ours.group_size, ours.dtype)
    assert torch.equal(got.scales.view(torch.int32), want.scales.view(torch.int32))
    values, expected = got.dequantize(), want.dequantize()
    assert torch.equal(values.isnan(), expected.isnan()) and int(values.isnan().sum()) == 2 * (group or 64)
    finite = ~expected.isnan()
    assert torch.equal(values[finite], expected[finite])
