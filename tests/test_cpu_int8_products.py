"""The CPU one-row decode over int8 codes through torch's integer matmul (kernels/torch/cpu_int8_products.py)
against the float64 reference.

The path serves long spans only (MIN_KEYS); the tests lower that bar so that small caches take it, and cut the
keys into chunks of a few keys (CHUNK_KEYS) so that chunk edges, a one-key chunk and the merge are crossed.
Every case checks that this path served, over dtypes (each has its own digit counts), GQA/MQA/MHA, odd head
dims down to MIN_HEAD_DIM, windows, sinks, per-token and per-head scales, unusual strides of every tensor
argument, long caches with peaked and flat attention (the digits' rounding adds up over the keys), extreme
magnitudes and codes of -128. The calls it must decline (short spans, a non-finite query, other formats,
per-channel scales, tiny head dims) are checked to be served elsewhere and still exact. Outputs and the integer
buffers start poisoned (tests/conftest.py), so an element read before it is written fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

import mfa_hf
from mfa_hf.kernels.contract import CacheSide, DecodeCall, Options
from mfa_hf.kernels.reference import attention_reference
from mfa_hf.kernels.torch import cpu_fused_decode, cpu_int8_products
from mfa_hf.kernels.torch.cpu_int8_products import _digits
from mfa_hf.testing_kvcache import (
    BATCH,
    DecodeCase,
    assert_matches_reference_over_cache,
    assert_path_switch_agrees,
    assert_served_and_matches_reference,
    make_decode_inputs,
    record_calls,
    run_kvcache,
    run_with_odd_layouts,
)

CAPACITY = 80


@pytest.fixture
def served(monkeypatch):
    """Counts the calls this path computed (the (start, length) of each), with every span and head dim from 8 up
    served (the gate serves long spans at D >= 64 only; the arithmetic is the same for any), also on a CPU whose
    integer matmul is torch's scalar loop (slow, but exact: the tests check the arithmetic)."""
    monkeypatch.setattr(cpu_int8_products, "int_mm_is_fast", lambda: True)
    monkeypatch.setattr(cpu_int8_products, "MAX_ITEMS", 1 << 20)
    monkeypatch.setattr(cpu_int8_products, "MIN_KEYS", 1)
    monkeypatch.setattr(cpu_int8_products, "MIN_HEAD_DIM", 8)
    return record_calls(monkeypatch, cpu_int8_products, "parts", lambda call, start, length: (start, length))


def _cases():
    windows = ((-1, -1), (9, -1), (0, -1), (200, 3))
    heads = ((4, 2), (4, 1), (3, 3), (8, 2))
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    dims = (64, 40, 72, 8)
    cases = []
    for i in range(12):
        cases.append(DecodeCase("int8", 1, dtypes[i % 3], heads[i % 4], dim=dims[(i // 3) % 4], window=windows[i % 4],
                                sinks=bool(i % 2)))
    return cases


@pytest.mark.parametrize("chunk_keys", [cpu_int8_products.CHUNK_KEYS, 7, 1],
                         ids=["one-chunk", "chunks-of-7", "chunks-of-1"])
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.id)
def test_matches_reference(case, chunk_keys, served, monkeypatch):
    monkeypatch.setattr(cpu_int8_products, "CHUNK_KEYS", chunk_keys)
    assert_served_and_matches_reference(case, CAPACITY, lambda: served[-1][1] if served else None,
                                        "integer-product path", seed=3)


def test_equals_the_widening_path(monkeypatch, served):
    """Same float32 inputs through this path and through cpu_scaled_codes (widened codes, float products) agree to
    float32 rounding: the digits lose nothing the float32 products keep."""
    monkeypatch.setattr(cpu_int8_products, "CHUNK_KEYS", 16)
    case = DecodeCase("int8", 1, torch.float32, (8, 2), window=(30, -1), sinks=True)
    assert_path_switch_agrees(lambda enabled: monkeypatch.setattr(cpu_int8_products, "ENABLED", enabled), case,
                              length=63, capacity=CAPACITY)
    assert served


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_equal_the_widening_path_to_their_rounding(dtype, monkeypatch, served):
    """Half-precision queries are widened to float32 first and take the same digits: the outputs equal the widening
    path's to the output dtype's rounding, and the float32 log-sum-exps to float32's."""
    case = DecodeCase("int8", 1, dtype, (8, 2), window=(30, -1), sinks=True)
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(cpu_int8_products, "ENABLED", enabled)
        results.append(run_kvcache(case, make_decode_inputs(case, (63,) * BATCH, CAPACITY, seed=5)))
    assert served
    (out_on, lse_on), (out_off, lse_off) = results
    torch.testing.assert_close(out_on, out_off)  # the dtype's own tolerance: one rounding step apart at most
    torch.testing.assert_close(lse_on, lse_off, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("granularity,serves", [("head", True), ("channel", False)])
def test_static_scales(granularity, serves, served):
    """Per-head scales factor out like per-token ones; per-channel ones do not (another path serves)."""
    g = torch.Generator().manual_seed(3)
    case = DecodeCase("int8", 1, torch.float32, (6, 2), sinks=True)
    inputs = make_decode_inputs(case, (50,) * BATCH, CAPACITY, seed=11)
    for name in ("k_cache", "v_cache"):
        content = torch.randn(BATCH, CAPACITY, 2, 64, generator=g)
        inputs[name] = mfa_hf.quantize_kv(content, "int8", granularity=granularity)
    out, lse = run_kvcache(case, inputs)
    assert bool(served) == serves
    assert_matches_reference_over_cache(case, inputs, out, lse)


@pytest.mark.parametrize("codes_layout", ["heads", "offset", "expanded-keys", "expanded-last"])
def test_unusual_strides_of_every_argument(codes_layout, served):
    case = DecodeCase("int8", 1, torch.float32, (8, 2), window=(40, -1), sinks=True)
    out, lse, reference_inputs = run_with_odd_layouts(case, codes_layout, CAPACITY, 57, seed=2)
    assert served
    assert_matches_reference_over_cache(case, reference_inputs, out, lse)


def _long_call(length: int, sharpness: float, dtype: torch.dtype, seed: int, *, value_scale: float = 1.0):
    """One row over `length` int8 keys, 6 query heads on 2 KV heads, D 64: a query `sharpness` times a unit normal
    (large: a few keys take nearly all the weight; small: the weight spreads over every key)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, length, 2, 64, generator=g)
    v = torch.randn(1, length, 2, 64, generator=g) * value_scale
    q = (torch.randn(1, 1, 6, 64, generator=g) * sharpness).to(dtype)
    keys, values = mfa_hf.quantize_kv(k, "int8"), mfa_hf.quantize_kv(v, "int8")
    call = DecodeCall(q, CacheSide(keys.codes, keys.scales, "int8", keys.group_size),
                      CacheSide(values.codes, values.scales, "int8", values.group_size),
                      torch.tensor([length], dtype=torch.int32), Options(64 ** -0.5, -1, 0))
    return call, keys.dequantize(torch.float64), values.dequantize(torch.float64)


def _assert_within_rule(out: torch.Tensor, call: DecodeCall, k64: torch.Tensor, v64: torch.Tensor) -> None:
    """The DESIGN rule: at most 2x the error of PyTorch's own math in the input dtype, plus a small floor."""
    q, dtype = call.q, call.q.dtype
    expected = attention_reference(q.double(), k64, v64, softmax_scale=call.options.scale)[0]
    torch_math = attention_reference(q, k64.to(dtype), v64.to(dtype), softmax_scale=call.options.scale,
                                     upcast=False)[0]
    own = (torch_math.double() - expected).abs().max().item()
    err = (out.double() - expected).abs().max().item()
    assert err <= 2 * own + 1e-5 * expected.abs().max().item(), (err, own)


@pytest.mark.parametrize("sharpness", [0.1, 1.0, 8.0], ids=["flat", "normal", "peaked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_long_caches_within_the_rule(sharpness, dtype, served, monkeypatch):
    """20k keys in 3 chunks: the digits' rounding, which adds up over the keys, stays within the reference rule."""
    monkeypatch.setattr(cpu_int8_products, "CHUNK_KEYS", 8192)
    call, k64, v64 = _long_call(20000, sharpness, dtype, seed=int(sharpness * 10))
    out, _ = cpu_fused_decode.decode(call, 20000)
    assert served[-1] == (0, 20000)
    _assert_within_rule(out, call, k64, v64)


@pytest.mark.parametrize("value_scale", [1e-30, 1e30], ids=["tiny-values", "huge-values"])
def test_extreme_magnitudes(value_scale, served):
    """Values near float32's range ends: the fixed point of the weights times those scales neither overflows nor
    flushes to zero."""
    call, k64, v64 = _long_call(300, 1.0, torch.float32, seed=5, value_scale=value_scale)
    out, _ = cpu_fused_decode.decode(call, 300)
    assert served
    _assert_within_rule(out, call, k64, v64)


def test_codes_of_minus_128_are_read_exactly(served):
    """A cache built elsewhere may hold -128 (quantize_kv writes [-127, 127]): a cache of nothing else, over more
    than one chunk, is still within the rule."""
    length = cpu_int8_products.CHUNK_KEYS + 5
    call, _, _ = _long_call(length, 1.0, torch.float32, seed=6)
    call.keys.codes.fill_(-128)
    call.values.codes.fill_(-128)
    k64 = call.keys.codes.double() * call.keys.scales.double()
    v64 = call.values.codes.double() * call.values.scales.double()
    out, _ = cpu_fused_decode.decode(call, length)
    assert served[-1] == (0, length) and len(served) == 1
    _assert_within_rule(out, call, k64, v64)


@pytest.mark.parametrize("transpose", [True, False], ids=["keys", "values"])
def test_a_full_chunk_of_the_largest_terms_stays_exact(transpose):
    """The integer sums' worst case: digits and codes all -128 (2^14 a term) over CHUNK_KEYS keys must not wrap
    around int32, for the values' product (a sum over the keys) and the keys' (a sum over D)."""
    keys, dim = cpu_int8_products.CHUNK_KEYS, 64
    codes = torch.full((1, keys, 1, dim), -128, dtype=torch.int8)
    digits = torch.full((1, 4, dim if transpose else keys), -128, dtype=torch.int8)
    products = cpu_int8_products._products(digits, codes, transpose=transpose)
    assert bool((products.long() == (1 << 14) * (dim if transpose else keys)).all())


@pytest.mark.parametrize("count", [2, 3, 4])
def test_digits_rebuild_their_rows(count):
    """top * sum_i place_i digit_i is each element to within half a step of the fixed point (top / 2^(8 count - 2))
    plus float32's own rounding of x / top, over rows 1e-20 to 1e20 in size; every digit is in [-128, 127], the top
    one in [-64, 64], and an all-zero row has all-zero digits."""
    g = torch.Generator().manual_seed(count)
    x = torch.randn(3, 5, 77, generator=g) * torch.logspace(-20, 20, 3).view(3, 1, 1)
    x[1, 2] = 0.0
    digits, top = _digits(x, count)
    one = float(1 << (8 * count - 2))
    d = digits.view(3, count, 5, 77).long()
    rebuilt = sum(d[:, i].double() * 256.0 ** i for i in range(count)) / one * top.double()
    bound = top.double() / one * 0.5 + x.double().abs() * 2.0 ** -23
    assert bool((rebuilt - x.double()).abs().le(bound).all())
    assert int(d[:, -1].abs().max()) <= 64
    assert int(d[1, :, 2].abs().max()) == 0


@pytest.mark.parametrize("keys,dim,batch,serves", [(8192, 64, 1, True), (8191, 64, 1, False), (8192, 32, 1, False),
                                                   (9000, 128, 4, True), (8192, 64, 5, False)])
def test_the_default_gate(keys, dim, batch, serves, monkeypatch):
    """Untouched, the gate serves spans of MIN_KEYS keys and more at head dims of 64 and more, for up to MAX_ITEMS
    (row, KV head) pairs (as measured), where torch's integer matmul is oneDNN's."""
    if not cpu_int8_products.int_mm_is_fast():
        serves = False
    calls = record_calls(monkeypatch, cpu_int8_products, "parts", lambda call, start, length: (start, length))
    g = torch.Generator().manual_seed(keys)
    k, v = torch.randn(batch, keys, 2, dim, generator=g), torch.randn(batch, keys, 2, dim, generator=g)
    q = torch.randn(batch, 1, 4, dim, generator=g)
    out = mfa_hf.flash_attn_with_kvcache(q, mfa_hf.quantize_kv(k, "int8"), mfa_hf.quantize_kv(v, "int8"),
                                         cache_seqlens=torch.tensor([keys] * batch, dtype=torch.int32), causal=True)
    assert bool(calls) == serves and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("reason", ["short", "inf-query", "fp8-values", "tiny-dim", "disabled", "slow-int-mm"])
def test_declined_calls_are_served_elsewhere_and_exact(reason, monkeypatch):
    """Each call this path must not take goes to another path, which gets it right."""
    calls = record_calls(monkeypatch, cpu_int8_products, "parts", lambda call, start, length: (start, length))
    monkeypatch.setattr(cpu_int8_products, "MIN_KEYS", 50 if reason == "short" else 1)
    monkeypatch.setattr(cpu_int8_products, "MIN_HEAD_DIM", 8)
    if reason == "disabled":
        monkeypatch.setattr(cpu_int8_products, "ENABLED", False)
    if reason == "slow-int-mm":  # a CPU without AVX512-VNNI, Apple Silicon included: torch's scalar loop
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    case = DecodeCase("int8", 1, torch.float32, (4, 2), dim=4 if reason == "tiny-dim" else 64,
                      v_format="fp8_e4m3" if reason == "fp8-values" else "same")
    inputs = make_decode_inputs(case, (40,) * BATCH, CAPACITY, seed=9)
    if reason == "inf-query":
        inputs["q"][1, 0, 2, 5] = float("inf")
    out, lse = run_kvcache(case, inputs)
    assert not calls
    assert_matches_reference_over_cache(case, inputs, out, lse)


@pytest.mark.parametrize("side", ["k_cache", "v_cache"])
def test_a_nan_scale_reaches_only_its_heads(side, served):
    """A NaN scale (what quantizing a NaN or inf token gives) makes the rows of its KV head's query heads NaN, and
    no others: each row's fixed point has its own largest magnitude."""
    case = DecodeCase("int8", 1, torch.float32, (4, 2))
    inputs = make_decode_inputs(case, (30,) * BATCH, CAPACITY)
    inputs[side].scales[2, 7, 1] = float("nan")
    out, _ = run_kvcache(case, inputs)
    assert served
    assert bool(out[2, 0, 2:4].isnan().all()) and bool(torch.isfinite(out[2, 0, :2]).all())
    assert bool(torch.isfinite(out[:2]).all())
