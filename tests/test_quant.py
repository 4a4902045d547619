"""Quantized KV formats: encodings, round-trip error bounds, storage bytes, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import mfa_hf
from mfa_hf import kv_formats
from mfa_hf.quant import (
    NF4_LEVELS,
    KVFormat,
    QuantizedKV,
    bytes_per_token_head,
    nf4_levels_from_quantiles,
    quantize_kv,
)

NF4_HALF_GAP = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2
# |x - dequantize(quantize(x))| <= relative * |x| + absolute * scale, per element, from each
# format's precision: fp8 e4m3 keeps 3 mantissa bits (half an ulp is 2^-4 of the value) and its
# smallest subnormal step is 2^-9; e5m2 keeps 2 bits, steps 2^-16; int8 rounds to the nearest
# multiple of the scale; nf4 to the nearest codebook level of a group scaled to absmax 1.
BOUNDS = {  # format: (relative, absolute in units of the scale)
    "fp8_e4m3": (2**-4, 2**-10),
    "fp8_e5m2": (2**-3, 2**-17),
    "int8": (0.0, 0.5),
    "nf4": (0.0, NF4_HALF_GAP),
}
# Measured on torch.randn(4, 256, 8, 128) (seed 0), scale per (token, head) / nf4 group of 64:
# relative RMS error ||x - x'|| / ||x||. docs/quantized-kv.md quotes these numbers.
DOCUMENTED_RELATIVE_RMS = {"fp8_e4m3": 0.0257, "fp8_e5m2": 0.0513, "int8": 0.0065, "nf4": 0.0920}
FLOAT32_SLACK = 4 * torch.finfo(torch.float32).eps  # x / scale * scale in float32


ROUND_TRIPS = [(f.value, g) for f in KVFormat for g in ("token", "head", "channel") if f.value != "nf4" or g == "token"]


@pytest.mark.parametrize("fmt,granularity", ROUND_TRIPS + [("nf4", 32)])
def test_round_trip_error_within_the_format_bound(fmt, granularity):
    g = torch.Generator().manual_seed(1)
    # Spread magnitudes over many binades (and outlier channels) so subnormals and saturation occur.
    x = torch.randn(2, 33, 3, 64, generator=g) * torch.logspace(-3, 1, 64)[torch.randperm(64, generator=g)]
    if granularity == 32:  # nf4 with groups of 32
        packed = quantize_kv(x, fmt, group_size=32)
    else:
        packed = quantize_kv(x, fmt, granularity=granularity)
    error = (packed.dequantize() - x).abs()
    relative, absolute = BOUNDS[fmt]
    scale = packed.scales.repeat_interleave(packed.group_size, dim=-1)
    bound = relative * x.abs() + absolute * scale + FLOAT32_SLACK * x.abs()
    worst = float((error / bound).max())
    assert worst <= 1.0, f"{fmt}/{granularity}: error reaches {worst:.3f} x the bound"


@pytest.mark.parametrize("fmt", [f.value for f in KVFormat])
def test_measured_error_matches_the_docs(fmt):
    x = torch.randn(4, 256, 8, 128, generator=torch.Generator().manual_seed(0))
    packed = quantize_kv(x, fmt)
    measured = float((packed.dequantize() - x).norm() / x.norm())
    assert measured == pytest.approx(DOCUMENTED_RELATIVE_RMS[fmt], rel=0.02)


def test_fp8_codes_are_float8_bytes_not_linear_uint8():
    x = torch.tensor([448.0, 1.0, -2.0, 0.0, 0.015625]).reshape(1, 1, 1, 5)
    e4m3 = quantize_kv(x, "fp8_e4m3")
    assert float(e4m3.scales) == 1.0  # absmax 448 maps onto e4m3's largest value
    # 448 = 0 1111 110, 1 = 0 0111 000, -2 = 1 1000 000, 0, 2^-6 = 0 0001 000
    assert e4m3.codes.flatten().tolist() == [0x7E, 0x38, 0xC0, 0x00, 0x08]
    e5m2 = quantize_kv(x * 128, "fp8_e5m2")  # absmax 57344 = e5m2's largest value: scale 1
    assert float(e5m2.scales) == 1.0
    assert e5m2.codes.flatten().tolist()[1:4] == [0x58, 0xDC, 0x00]  # 128 = 0 10110 00, -256 = 1 10111 00, 0


def test_int8_is_symmetric_per_token_head():
    x = torch.tensor([[-3.0, 1.5, 0.0, 3.0], [0.5, -0.25, 0.0, 0.1]]).reshape(1, 2, 1, 4)
    packed = quantize_kv(x, "int8")
    assert packed.scales.flatten().tolist() == pytest.approx([3 / 127, 0.5 / 127])
    assert packed.codes[0, 0, 0].tolist() == [-127, 64, 0, 127]  # 1.5 / (3 / 127) = 63.5 rounds (to even) to 64


def test_nf4_codebook_and_nibble_order():
    derived = nf4_levels_from_quantiles()
    assert torch.allclose(derived, torch.tensor(NF4_LEVELS, dtype=torch.float64), atol=1e-6)
    levels = torch.tensor(NF4_LEVELS)
    # One group of 32: element 2i -> low nibble, 2i + 1 -> high nibble.
    indices = torch.arange(32) % 16
    x = levels[indices].reshape(1, 1, 1, 32)
    packed = quantize_kv(x, "nf4", group_size=32)
    assert packed.codes.shape == (1, 1, 1, 16)
    assert packed.codes[0, 0, 0, 0].item() == (1 << 4) | 0
    assert packed.codes[0, 0, 0, 7].item() == (15 << 4) | 14
    assert torch.equal(packed.dequantize(), x)


def test_nf4_codes_are_the_nearest_level_ties_down():
    """Each scaled value gets the nearest level's index: the same as a binary search over the midpoints
    (torch.bucketize) for random values, values on a midpoint (the lower level), one float either side of it,
    the ends, and NaN (whose group's scale is NaN anyway)."""
    spec = kv_formats.spec("nf4")
    levels = torch.tensor(NF4_LEVELS)
    midpoints = (levels[1:] + levels[:-1]) / 2
    edges = torch.cat([midpoints, midpoints.nextafter(torch.tensor(2.0)), midpoints.nextafter(torch.tensor(-2.0)),
                       levels, torch.tensor([-1.0, 1.0, 0.0, -0.0, math.nan])])
    values = torch.cat([edges, torch.rand(4000, generator=torch.Generator().manual_seed(0)) * 2 - 1])
    values = values[: values.numel() // 2 * 2]
    codes = spec.encode(values.view(1, 1, 1, -1))
    indices = torch.stack((codes & 0xF, codes >> 4), dim=-1).reshape(-1)
    assert torch.equal(indices, torch.bucketize(values, midpoints).to(torch.uint8))
    assert torch.equal(indices[:15], torch.arange(15, dtype=torch.uint8))  # a tie goes to the lower level


@pytest.mark.parametrize("fmt,group_size,granularity,expected", [
    ("fp8_e4m3", None, "token", 128 + 4), ("fp8_e5m2", None, "token", 128 + 4), ("int8", None, "token", 128 + 4),
    ("nf4", 64, "token", 64 + 2 * 4), ("nf4", 32, "token", 64 + 4 * 4),
    ("int8", None, "head", 128), ("fp8_e4m3", None, "channel", 128),
])
def test_storage_bytes_per_token_and_head(fmt, group_size, granularity, expected):
    batch, tokens, heads, dim = 2, 40, 4, 128
    packed = quantize_kv(torch.randn(batch, tokens, heads, dim), fmt, group_size=group_size, granularity=granularity)
    assert bytes_per_token_head(fmt, dim, group_size, granularity) == expected
    static_bytes = 0 if granularity == "token" else packed.scales.numel() * 4  # shared by every token
    assert packed.nbytes() - static_bytes == expected * batch * tokens * heads
    assert packed.codes.element_size() == 1


def test_cache_allocation_holds_the_documented_bytes():
    cache = mfa_hf.allocate_kv_cache(2, 100, 4, 128, "nf4", group_size=64)
    assert cache.nbytes() == 2 * 100 * 4 * 72


def test_all_zero_groups_round_trip_to_zero():
    for fmt in KVFormat:
        packed = quantize_kv(torch.zeros(1, 2, 1, 64), fmt)
        assert torch.equal(packed.dequantize(), torch.zeros(1, 2, 1, 64))
        assert bool(torch.isfinite(packed.scales).all())


@pytest.mark.parametrize("fmt", [f.value for f in KVFormat])
@pytest.mark.parametrize("bad", [math.nan, -math.nan, math.inf, -math.inf])
def test_a_nan_or_inf_makes_its_group_nan_not_zero(fmt, bad):
    """A group holding NaN or inf dequantizes to NaN (its scale is NaN: int8 and nf4 have no NaN code); before,
    its scale fell back to 1 and the group came back as zeros, the NaN gone. Other groups and tokens keep their
    values. Also through the append of a cache (one token at a time, K and V together)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 2, 64, generator=g)
    x[1, 2, 0, 5] = bad
    group = 32 if fmt == "nf4" else 64
    poisoned = torch.zeros(2, 3, 2, 64, dtype=torch.bool)
    poisoned[1, 2, 0, :group] = True  # the group of element 5
    clean = x.masked_fill(poisoned, 0.0)
    for packed in (quantize_kv(x, fmt, group_size=32 if fmt == "nf4" else None), _appended(x, fmt)):
        values = packed.dequantize()
        assert bool(values[poisoned].isnan().all())
        want = quantize_kv(clean, fmt, group_size=32 if fmt == "nf4" else None).dequantize()
        assert torch.equal(values[~poisoned], want[~poisoned])


def _appended(x, fmt):
    group = 32 if fmt == "nf4" else None
    k_cache, v_cache = (mfa_hf.allocate_kv_cache(2, 8, 2, 64, fmt, group_size=group) for _ in range(2))
    for t in range(x.shape[1]):
        mfa_hf.flash_attn_with_kvcache(torch.randn(2, 1, 2, 64), k_cache, v_cache, x[:, t:t + 1], x[:, t:t + 1],
                                       cache_seqlens=t)
    return mfa_hf.QuantizedKV(k_cache.codes[:, :3], k_cache.scales[:, :3], k_cache.format, k_cache.group_size,
                              k_cache.dtype)


def test_static_scales_saturate_out_of_range_values():
    x = torch.randn(1, 4, 2, 64)
    static = quantize_kv(x, "fp8_e4m3", granularity="head").scales
    big = quantize_kv(x * 100, "fp8_e4m3", scales=static).dequantize()
    assert bool(torch.isfinite(big).all())
    assert float(big.abs().max()) <= 448 * float(static.max()) * (1 + 1e-6)


# ----------------------------------------------------------------------------------------------
# Bad input: each a clear error naming the argument.


def test_nf4_head_dim_not_divisible_by_group():
    with pytest.raises(ValueError, match=r"x: expected a head dim divisible by the nf4 group size 32, got 48"):
        quantize_kv(torch.randn(1, 2, 1, 48), "nf4", group_size=32)
    with pytest.raises(ValueError, match=r"head_dim: expected a multiple of the nf4 group size 64"):
        mfa_hf.allocate_kv_cache(1, 8, 1, 96, "nf4")
    with pytest.raises(ValueError, match=r"group_size: expected 32 or 64 for nf4, got 16"):
        quantize_kv(torch.randn(1, 2, 1, 64), "nf4", group_size=16)


def test_unknown_format():
    with pytest.raises(ValueError, match=r"format: expected one of fp8_e4m3, fp8_e5m2, int8, nf4, got 'fp8'"):
        quantize_kv(torch.randn(1, 2, 1, 64), "fp8")


def test_scales_of_the_wrong_shape():
    packed = quantize_kv(torch.randn(2, 5, 3, 64), "int8")
    with pytest.raises(ValueError, match=r"QuantizedKV.scales: expected shape \(2 or 1, 5 or 1, 3, 1\).*got \(2, 5, 3, 2\)"):
        QuantizedKV(packed.codes, torch.ones(2, 5, 3, 2), "int8", 64)
    with pytest.raises(TypeError, match=r"QuantizedKV.scales: expected dtype torch.float32, got torch.float16"):
        QuantizedKV(packed.codes, packed.scales.half(), "int8", 64)
    with pytest.raises(TypeError, match=r"QuantizedKV.codes: expected dtype torch.uint8 for fp8_e4m3, got torch.int8"):
        QuantizedKV(packed.codes, packed.scales, "fp8_e4m3", 64)
    codes, scale = mfa_hf.quantize_kv_int8(torch.randn(1, 2, 8, 64))
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match=r"k_scale: expected shape \(1 or 1, 2, 8 or 1, G\).*got \(1, 2, 4, 1\)"):
        mfa_hf.flash_attention_int8(q, codes, codes, scale[:, :, :4], scale)


def test_quantize_rejects_non_float_and_wrong_rank():
    with pytest.raises(ValueError, match=r"x: expected a 4-D float tensor, got a 3-D"):
        quantize_kv(torch.randn(2, 3, 4), "int8")
    with pytest.raises(ValueError, match=r"granularity: expected 'token', 'head' or 'channel', got 'row'"):
        quantize_kv(torch.randn(1, 2, 1, 64), "int8", granularity="row")


def test_quantized_kv_is_inference_only():
    q = torch.randn(1, 4, 2, 64, requires_grad=True)
    k = quantize_kv(torch.randn(1, 4, 2, 64), "int8")
    with pytest.raises(ValueError, match=r"q: quantized k/v serve inference only"):
        mfa_hf.flash_attn_func(q, k, k)
    with pytest.raises(ValueError, match=r"attn_mask: not supported with quantized k/v"):
        mfa_hf.flash_attn_func(q.detach(), k, k, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"k, v: expected both QuantizedKV or both tensors"):
        mfa_hf.flash_attn_func(q.detach(), k, torch.randn(1, 4, 2, 64))


def test_mixed_formats_between_k_and_v_are_served():
    """int8 keys with per-channel scales next to nf4 values: the torch backend serves any pair."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 6, 2, 64, generator=g) for _ in range(3))
    qk, qv = quantize_kv(k, "int8", granularity="channel"), quantize_kv(v, "nf4", group_size=32)
    out = mfa_hf.flash_attn_func(q, qk, qv, causal=True)
    from mfa_hf.kernels.reference import attention_reference

    ref, _ = attention_reference(q.double(), qk.dequantize(torch.float64), qv.dequantize(torch.float64), causal=True)
    assert float((out.double() - ref).abs().max()) < 1e-5
    assert math.isfinite(float(out.sum()))


@pytest.mark.parametrize("fmt, granularity", ROUND_TRIPS)
@pytest.mark.parametrize("how", ["transpose", "layout-bhsd", "compat"])
def test_every_granularity_has_a_heads_first_view(fmt, granularity, how):
    """flash_attention (B, H, S, D) over QuantizedKV of every scale granularity, heads-first by transpose(1, 2),
    quantize_kv(layout="bhsd") or the mps-flash-attn functions' codes and scales: per-head and per-channel scales
    (token dim 1) were checked in (B, S, H) order and refused (session 25)."""
    g = torch.Generator().manual_seed(len(fmt) + len(granularity))
    q, k, v = (torch.randn(2, 3, 5, 64, generator=g) for _ in range(3))  # (B, H, S, D)
    options = {} if fmt == "nf4" else {"granularity": granularity}
    if how == "transpose":
        qk, qv = (quantize_kv(x.transpose(1, 2), fmt, **options).transpose(1, 2) for x in (k, v))
    else:
        qk, qv = (quantize_kv(x, fmt, layout="bhsd", **options) for x in (k, v))
    assert qk.heads_first and qk.shape == k.shape and qk.transpose(1, 2).shape == k.transpose(1, 2).shape
    with torch.no_grad():
        if how == "compat":
            codes = (q, qk.codes, qv.codes, qk.scales, qv.scales)
            if fmt.startswith("fp8"):
                out = mfa_hf.flash_attention_fp8(*codes, is_causal=True, fp8_format=fmt[4:])
            else:
                call = {"int8": mfa_hf.flash_attention_int8, "nf4": mfa_hf.flash_attention_nf4}[fmt]
                out = call(*codes, is_causal=True)
        else:
            out = mfa_hf.flash_attention(q, qk, qv, is_causal=True)
    from mfa_hf.kernels.reference import attention_reference

    dk, dv = (x.dequantize(torch.float64).transpose(1, 2) for x in (qk, qv))
    ref, _ = attention_reference(q.transpose(1, 2).double(), dk, dv, causal=True)
    assert float((out.transpose(1, 2).double() - ref).abs().max()) < 1e-5
    # each call names the orientation it takes when given the other
    with pytest.raises(ValueError, match=r"k: expected a \(B, H, S, D\) QuantizedKV"):
        mfa_hf.flash_attention(q, qk.transpose(1, 2), qv.transpose(1, 2))
    with pytest.raises(ValueError, match=r"k: expected a \(B, S, H, D\) QuantizedKV"):
        mfa_hf.flash_attn_func(q.transpose(1, 2), qk, qv)
    with pytest.raises(ValueError, match=r"k_cache: expected a \(B, S, H, D\) QuantizedKV"):
        mfa_hf.flash_attn_with_kvcache(q.transpose(1, 2), qk, qv)


@pytest.mark.parametrize("fmt", list(kv_formats.QUANTIZED_NAMES))
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced", "expanded", "flat", "empty"])
def test_decode_from_byte_tables_equals_element_by_element(fmt, layout):
    """Every byte value (NaN codes included) decodes through the 256-entry tables to what float8 conversion or
    nibble unpacking into the codebook gives, in any layout of the codes, also when written into a buffer."""
    spec = kv_formats.spec(fmt)
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(spec.code_dtype)
    codes = every[torch.randperm(256, generator=torch.Generator().manual_seed(0))].repeat(6).view(2, 3, 4, 64)
    if layout == "transposed":
        codes = codes.transpose(1, 2)
    elif layout == "sliced":
        codes = codes[:, 1:, :, ::2]
    elif layout == "expanded":  # one position broadcast along the sequence (stride 0)
        codes = codes[:, :1].expand(2, 5, 4, 64)
    elif layout == "flat":
        codes = codes.reshape(-1)
    elif layout == "empty":
        codes = codes[:, :0]
    expected = spec.decode_bytes(codes)
    into = torch.full(expected.shape, 7.0)
    for got in (spec.decode(codes), spec.decode_into(codes, into), into):
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(expected))
