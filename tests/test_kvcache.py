"""flash_attn_with_kvcache and attention over quantized K/V against the float64 reference.

The reference runs on the *dequantized* cache, so the comparison isolates the kernel (split-K,
block-wise dequantization, append) from the quantization error, and the DESIGN.md rule applies.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import mfa_hf
from mfa_hf import trace
from mfa_hf.kernels.reference import attention_reference
from mfa_hf.kernels.torch import cache_blocks, cpu_fused_decode, decode
from mfa_hf.testing import FORWARD_FACTOR, GRADIENT_FACTOR, assert_close_to_reference
from mfa_hf.quant import encode
from mfa_hf.testing_kvcache import (
    BATCH,
    CACHE_ROWS,
    FORMATS,
    DecodeCase,
    dense,
    make_decode_inputs,
    reference_over_cache,
    run_kvcache,
)

MAX_SEQLEN = 96
LENGTHS = (0, 37, 70)  # ragged, one empty before the append
CacheCase = DecodeCase


def _cases() -> list[CacheCase]:
    features = ({}, {"softcap": 4.0}, {"sinks": True}, {"window": (9, -1)}, {"alibi": True},
                {"batch_idx": True}, {"num_splits": 5}, {"causal": False, "window": (6, 3), "sinks": True},
                {"batch_idx": True, "softcap": 3.0, "alibi": True, "num_splits": 3}, {"causal": False})
    heads = ((4, 2), (4, 1), (3, 3))
    cases = []
    for n, (fmt, lq) in enumerate(itertools.product(FORMATS, (1, 4, 17))):
        dtype = torch.bfloat16 if n % 3 == 1 else torch.float32
        cases.append(CacheCase(fmt, lq, dtype, heads[n % 3], **features[n % len(features)]))
        cases.append(CacheCase(fmt, lq, dtype, heads[(n + 1) % 3], **features[(n + 5) % len(features)]))
    return cases


def make_cache_inputs(case: CacheCase, seed: int = 0) -> dict:
    return make_decode_inputs(case, LENGTHS, MAX_SEQLEN, seed)


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.id)
def test_kvcache_matches_reference(case, small_tiles):
    inputs = make_cache_inputs(case)
    with trace.capture() as calls:
        out, lse = run_kvcache(case, inputs)
    assert trace.served_by(calls)[("torch", "decode")] == 1
    # After the call the cache holds the appended tokens: the reference reads them back from it.
    ref, ref_lse = reference_over_cache(case, inputs, upcast=True)
    base, base_lse = reference_over_cache(case, inputs, upcast=False)
    factor = GRADIENT_FACTOR if case.softcap else FORWARD_FACTOR
    assert_close_to_reference(out, ref, base, factor, "out")
    assert_close_to_reference(lse, ref_lse, base_lse, factor, "lse")


def _check_against_reference(case, inputs):
    out, lse = run_kvcache(case, inputs)
    ref, ref_lse = reference_over_cache(case, inputs, upcast=True)
    base, base_lse = reference_over_cache(case, inputs, upcast=False)
    factor = GRADIENT_FACTOR if case.softcap else FORWARD_FACTOR
    assert_close_to_reference(out, ref, base, factor, "out")
    assert_close_to_reference(lse, ref_lse, base_lse, factor, "lse")


@pytest.mark.parametrize("batch_idx", [False, True], ids=["rows", "batch_idx"])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f or "plain")
def test_full_cache_with_a_split_past_its_end(fmt, batch_idx, small_tiles, monkeypatch):
    """Full caches after the append, 7 splits of 14 keys over 96: the last split's runs reach past the
    cache's end (read as zeros, masked) while each split spans two key tiles (runs not back to back).
    The block loop's case: the fused CPU path (tests/test_cpu_fused_decode.py) is off."""
    monkeypatch.setattr(cpu_fused_decode, "ENABLED", False)
    for dtype in (torch.float32, torch.bfloat16):
        case = CacheCase(fmt, lq=1, dtype=dtype, heads=(4, 2), batch_idx=batch_idx, num_splits=7, sinks=True)
        inputs = make_decode_inputs(case, (MAX_SEQLEN - 1,) * BATCH, MAX_SEQLEN)
        _check_against_reference(case, inputs)


def test_take_reads_runs_like_a_gather():
    """cache_blocks._take against index_select on the same positions: strided and sliced caches, rows,
    dtype conversion, runs that touch (a view) or not (a copy), and positions past the end (zeros)."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 40, 3, 16, generator=g)
    caches = {"contiguous": base[:, :30], "strided": base.transpose(0, 1).contiguous().transpose(0, 1)[:, 5:35]}
    rows = torch.tensor([3, 0], dtype=torch.long)
    for name, cache in caches.items():
        for window in (cache_blocks.KeyRuns(2, 6, 4, 6), cache_blocks.KeyRuns(1, 9, 3, 4),
                       cache_blocks.KeyRuns(7, 8, 3, 8)):
            positions = (window.start + torch.arange(window.runs)[:, None] * window.stride
                         + torch.arange(window.count)).reshape(-1)
            inside = positions < cache.shape[1]
            for take_rows in (None, rows):
                for dtype in (torch.float32, torch.float64):
                    got = cache_blocks._take(cache, window, take_rows, dtype, view_ok=dtype == torch.float32)
                    assert dtype != torch.float64 or got.is_contiguous()
                    picked = cache if take_rows is None else cache.index_select(0, take_rows)
                    want = picked.index_select(1, positions.clamp(max=cache.shape[1] - 1)).transpose(1, 2).to(dtype)
                    want = want * inside[None, None, :, None]
                    assert torch.equal(got, want), f"{name} {window} rows={take_rows} {dtype}"


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f or "plain")
def test_appended_tokens_are_the_new_k_v(fmt):
    """The append wrote the new tokens (quantized as a whole-sequence quantize_kv would) in place."""
    case = CacheCase(fmt, lq=4, batch_idx=True)
    inputs = make_cache_inputs(case)
    before_k = dense(inputs["k_cache"]).clone()
    run_kvcache(case, inputs)
    after_k = dense(inputs["k_cache"])
    expected_new = dense(mfa_hf.quantize_kv(inputs["k"], fmt) if fmt else inputs["k"])
    for b, (row, start) in enumerate(zip(inputs["cache_batch_idx"].tolist(), LENGTHS)):
        torch.testing.assert_close(after_k[row, start : start + 4], expected_new[b], rtol=0, atol=0)
        untouched = torch.ones(MAX_SEQLEN, dtype=torch.bool)
        untouched[start : start + 4] = False
        torch.testing.assert_close(after_k[row, untouched], before_k[row, untouched], rtol=0, atol=0)
    never_named = [r for r in range(CACHE_ROWS) if r not in inputs["cache_batch_idx"].tolist()]
    torch.testing.assert_close(after_k[never_named], before_k[never_named], rtol=0, atol=0)


@pytest.mark.parametrize("fmt,granularity", [("fp8_e4m3", "token"), ("fp8_e5m2", "token"), ("int8", "token"),
                                             ("nf4", "token"), ("int8", "channel"), ("fp8_e4m3", "head")])
def test_appending_equals_quantizing_the_whole_sequence(fmt, granularity):
    g = torch.Generator().manual_seed(3)
    batch, total, heads, dim = 2, 23, 2, 64
    k = torch.randn(batch, total, heads, dim, generator=g)
    whole = mfa_hf.quantize_kv(k, fmt, granularity=granularity)
    static = None if granularity == "token" else whole.scales
    cache = mfa_hf.allocate_kv_cache(batch, 32, heads, dim, fmt, static_scales=static)
    v_cache = mfa_hf.allocate_kv_cache(batch, 32, heads, dim, fmt, static_scales=static)
    length = 0
    for count in (5, 1, 9, 8):  # a prefill, a decode step, two chunks
        q = torch.randn(batch, count, 4, dim, generator=g)
        new = k[:, length : length + count]
        mfa_hf.flash_attn_with_kvcache(q, cache, v_cache, new, new, cache_seqlens=length)
        length += count
    assert torch.equal(cache.codes[:, :total], whole.codes)
    got_scales = cache.scales if static is not None else cache.scales[:, :total]
    assert torch.equal(got_scales, whole.scales)


@pytest.mark.parametrize("fmt,granularity", [("int8", "channel"), ("fp8_e4m3", "head"), ("fp8_e5m2", "channel")])
def test_a_one_position_cache_reuses_static_scales_of_batch_1(fmt, granularity):
    """A one-position cache (each step rewrites position 0) with static scales of batch 1 on 2 rows: they are reused
    as at any capacity. They were read as per-token scales there, and the append failed in torch's words."""
    g = torch.Generator().manual_seed(8)
    batch, heads, dim = 2, 2, 32
    static = mfa_hf.quantize_kv(torch.randn(1, 4, heads, dim, generator=g), fmt, granularity=granularity).scales
    caches = [mfa_hf.allocate_kv_cache(batch, 1, heads, dim, fmt, static_scales=static.clone()) for _ in range(2)]
    for _ in range(2):
        new = torch.randn(batch, 1, heads, dim, generator=g)
        mfa_hf.flash_attn_with_kvcache(torch.randn(batch, 1, 4, dim, generator=g), *caches, new, new, cache_seqlens=0)
        for cache in caches:
            assert torch.equal(cache.codes, encode(new, static, cache.format, cache.group_size))
            assert torch.equal(cache.scales, static)


def test_static_scales_a_one_position_cache_would_read_as_per_token_are_refused():
    """Scales of the cache's own batch on one position have the layout of per-token scales: refused, naming them."""
    for batch in (1, 3):
        with pytest.raises(ValueError, match=r"static_scales: a cache of one position \(max_seqlen 1\)"):
            mfa_hf.allocate_kv_cache(batch, 1, 2, 32, "int8", static_scales=torch.full((batch, 1, 2, 1), 0.1))
        mfa_hf.allocate_kv_cache(batch, 2, 2, 32, "int8", static_scales=torch.full((batch, 1, 2, 1), 0.1))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("side", ["k_cache", "v_cache"])
def test_static_scales_of_a_cache_built_directly_are_checked_before_an_append(bad, side):
    """QuantizedKV(codes, scales) takes scales unchecked; appending with a static scale of 0 wrote every new token as
    0 without a word (NaN: NaN outputs). Refused naming the side, the cache untouched; an in-place change of scales
    that passed is checked again."""
    g = torch.Generator().manual_seed(9)
    heads, dim = 2, 32
    good = torch.full((1, 1, heads, 1), 0.05)
    caches = {name: mfa_hf.QuantizedKV(torch.zeros(2, 8, heads, dim, dtype=torch.int8), good.clone(), "int8", dim)
              for name in ("k_cache", "v_cache")}
    new = torch.randn(2, 1, heads, dim, generator=g)
    q = torch.randn(2, 1, 4, dim, generator=g)
    mfa_hf.flash_attn_with_kvcache(q, caches["k_cache"], caches["v_cache"], new, new, cache_seqlens=0)
    caches[side].scales[0, 0, 1, 0] = bad  # in place, after a check that passed
    before = caches[side].codes.clone()
    with pytest.raises(ValueError, match=f"{side}.scales: expected finite values > 0"):
        mfa_hf.flash_attn_with_kvcache(q, caches["k_cache"], caches["v_cache"], new, new, cache_seqlens=1)
    assert torch.equal(caches[side].codes, before)
    fresh = mfa_hf.QuantizedKV(torch.zeros(2, 8, heads, dim, dtype=torch.int8), torch.full_like(good, bad), "int8",
                               dim)
    other = mfa_hf.QuantizedKV(torch.zeros(2, 8, heads, dim, dtype=torch.int8), good.clone(), "int8", dim)
    pair = (fresh, other) if side == "k_cache" else (other, fresh)
    with pytest.raises(ValueError, match=f"{side}.scales: expected finite values > 0"):
        mfa_hf.flash_attn_with_kvcache(q, *pair, new, new, cache_seqlens=0)


@pytest.mark.parametrize("fmt", FORMATS[1:])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_prefill_over_quantized_kv(fmt, layout, small_tiles):
    """flash_attn_func / flash_attention accept QuantizedKV k and v (Lq > Lk and < Lk)."""
    g = torch.Generator().manual_seed(5)
    for lq, lk in ((29, 40), (40, 29)):
        q = torch.randn(2, lq, 4, 64, generator=g)
        k, v = (torch.randn(2, lk, 2, 64, generator=g) for _ in range(2))
        with trace.capture() as calls:
            if layout == "bshd":
                qk, qv = mfa_hf.quantize_kv(k, fmt), mfa_hf.quantize_kv(v, fmt)
                out = mfa_hf.flash_attn_func(q, qk, qv, causal=True, softcap=5.0)
            else:
                qk = mfa_hf.quantize_kv(k.transpose(1, 2), fmt, layout="bhsd")
                qv = mfa_hf.quantize_kv(v.transpose(1, 2), fmt, layout="bhsd")
                out = mfa_hf.flash_attention(q.transpose(1, 2), qk, qv, is_causal=True, softcap=5.0).transpose(1, 2)
                qk, qv = qk.transpose(1, 2), qv.transpose(1, 2)
        assert trace.served_by(calls)[("torch", "decode")] == 1
        dk, dv = qk.dequantize(torch.float64), qv.dequantize(torch.float64)
        ref, _ = attention_reference(q.double(), dk, dv, causal=True, softcap=5.0)
        base, _ = attention_reference(q, dk.float(), dv.float(), causal=True, softcap=5.0, upcast=False)
        assert_close_to_reference(out, ref, base, GRADIENT_FACTOR, f"out lq={lq} lk={lk}")


@pytest.mark.parametrize("fmt", ["fp8", "int8", "nf4"])
def test_compat_names(fmt):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 12, 64, generator=g)
    k, v = (torch.randn(1, 2, 12, 64, generator=g) for _ in range(2))
    quantize = getattr(mfa_hf, f"quantize_kv_{fmt}")
    attend = getattr(mfa_hf, f"flash_attention_{fmt}")
    (k_codes, k_scale), (v_codes, v_scale) = quantize(k), quantize(v)
    assert k_codes.shape[:3] == (1, 2, 12) and k_scale.shape[:3] == (1, 2, 12)
    out = attend(q, k_codes, v_codes, k_scale, v_scale, is_causal=True)
    name = {"fp8": "fp8_e4m3"}.get(fmt, fmt)
    dk = mfa_hf.quantize_kv(k, name, layout="bhsd").dequantize(torch.float64)
    dv = mfa_hf.quantize_kv(v, name, layout="bhsd").dequantize(torch.float64)
    ref, _ = attention_reference(q.double().transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), causal=True)
    base, _ = attention_reference(q.transpose(1, 2), dk.float().transpose(1, 2), dv.float().transpose(1, 2),
                                  causal=True, upcast=False)
    assert_close_to_reference(out.transpose(1, 2), ref, base, FORWARD_FACTOR, "out")


def test_auto_splits_come_from_the_shape():
    long_decode = decode.plan_decode(batch=1, heads_kv=8, group=4, lq=1, key_span=65536)
    short = decode.plan_decode(batch=1, heads_kv=8, group=4, lq=1, key_span=300)
    prefill = decode.plan_decode(batch=1, heads_kv=8, group=4, lq=2048, key_span=65536)
    assert long_decode.num_splits == decode.SPLITS.target_work // 8
    assert short.num_splits == 1 and prefill.num_splits == 1


def test_auto_splits_agree_with_one_split(monkeypatch, small_tiles):
    """num_splits=0 on a shape where the plan splits gives the one-split answer (up to rounding)."""
    monkeypatch.setattr(decode, "SPLITS", dataclasses.replace(decode.SPLITS, min_keys=8))
    case = CacheCase("int8", lq=1, heads=(4, 1))
    assert decode.plan_decode(BATCH, 1, 4, 1, 70).num_splits > 1
    split, _ = run_kvcache(case, make_cache_inputs(case))
    one, _ = run_kvcache(CacheCase("int8", lq=1, heads=(4, 1), num_splits=1), make_cache_inputs(case))
    torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-6)


def test_empty_rows_output_zero_and_lse_minus_inf():
    """A sequence with no cached keys and no new ones sees nothing: 0 out, -inf LSE (never NaN)."""
    q = torch.randn(2, 1, 2, 32)
    cache = mfa_hf.allocate_kv_cache(2, 16, 2, 32, "int8")
    v_cache = mfa_hf.allocate_kv_cache(2, 16, 2, 32, "int8")
    out, lse = mfa_hf.flash_attn_with_kvcache(q, cache, v_cache, cache_seqlens=torch.tensor([0, 3], dtype=torch.int32),
                                             return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and bool((lse[0] == -float("inf")).all())
    assert bool(torch.isfinite(out[1]).all())


def test_decode_op_under_compile():
    cache = mfa_hf.allocate_kv_cache(1, 32, 2, 64, "fp8_e4m3")
    v_cache = mfa_hf.allocate_kv_cache(1, 32, 2, 64, "fp8_e4m3")
    q, k = torch.randn(1, 1, 4, 64), torch.randn(1, 1, 2, 64)
    lengths = torch.tensor([7], dtype=torch.int32)
    mfa_hf.flash_attn_with_kvcache(q, cache, v_cache, torch.randn(1, 7, 2, 64), torch.randn(1, 7, 2, 64),
                                   cache_seqlens=torch.zeros(1, dtype=torch.int32))
    eager = mfa_hf.flash_attn_with_kvcache(q, cache, v_cache, cache_seqlens=lengths)
    compiled = torch.compile(lambda q: mfa_hf.flash_attn_with_kvcache(q, cache, v_cache, cache_seqlens=lengths),
                             fullgraph=True)
    torch.testing.assert_close(compiled(q), eager)
    # An int length: the equal-lengths vector is built inside the graph, and eager calls afterwards
    # must not get a traced tensor from the reuse cache.
    compiled_int = torch.compile(lambda q: mfa_hf.flash_attn_with_kvcache(q, cache, v_cache, cache_seqlens=7),
                                 fullgraph=True)
    torch.testing.assert_close(compiled_int(q), eager)
    torch.testing.assert_close(mfa_hf.flash_attn_with_kvcache(q, cache, v_cache, cache_seqlens=7), eager)
    del k


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error, and the cache exactly as it was.


def _snapshot(cache) -> list[torch.Tensor]:
    if isinstance(cache, mfa_hf.QuantizedKV):
        return [cache.codes.clone(), cache.scales.clone()]
    return [cache.clone()]


def _assert_untouched(cache, snapshot) -> None:
    now = _snapshot(cache)
    assert all(torch.equal(a, b) for a, b in zip(now, snapshot)), "the cache changed on a rejected call"


BAD_CALLS = {
    "v_cache shape": (dict(v_cache="short"), ValueError, r"v_cache: expected \(B, S, Hkv\) = \(5, 96, 2\) like k_cache"),
    "seqlens dtype": (dict(cache_seqlens=torch.tensor([0.0, 1.0, 2.0])), TypeError,
                      r"cache_seqlens: expected dtype torch.int32 \(or int64\), got torch.float32"),
    "seqlens shape": (dict(cache_seqlens=torch.zeros(4, dtype=torch.int32)), ValueError,
                      r"cache_seqlens: expected shape \(3,\), got \(4,\)"),
    "past capacity": (dict(cache_seqlens=torch.tensor([0, 10, 93], dtype=torch.int32)), ValueError,
                      r"cache_seqlens: expected lengths \+ 4 new tokens <= the cache capacity 96, got \[0, 10, 93\]"),
    "negative length": (dict(cache_seqlens=torch.tensor([0, -1, 3], dtype=torch.int32)), ValueError,
                        r"cache_seqlens: expected lengths >= 0"),
    "int length past capacity": (dict(cache_seqlens=93), ValueError,
                                 r"cache_seqlens: expected a length in \[0, 92\] \(the cache capacity 96 minus 4 "
                                 r"new tokens\), got 93"),
    "negative int length": (dict(cache_seqlens=-1), ValueError, r"cache_seqlens: expected a length in \[0, 92\]"),
    "k without v": (dict(v=None), ValueError, r"k, v: expected both or neither"),
    "k shape": (dict(k="wide"), ValueError, r"k: expected shape \(B, Lnew, Hkv, D\) = \(3, 4, 2, 64\), got \(3, 4, 4, 64\)"),
    "batch idx range": (dict(cache_batch_idx=torch.tensor([0, 1, 5], dtype=torch.int32)), ValueError,
                        r"cache_batch_idx: expected rows in \[0, 5\), got \[0, 1, 5\]"),
    "batch idx repeats": (dict(cache_batch_idx=torch.tensor([1, 1, 2], dtype=torch.int32)), ValueError,
                          r"cache_batch_idx: expected distinct rows when appending"),
    "mixed kinds": (dict(v_cache="plain"), TypeError, r"k_cache, v_cache: expected both QuantizedKV or both tensors"),
    "num_splits": (dict(num_splits=-2), ValueError, r"num_splits: expected an int >= 0"),
    "sinks": (dict(sinks=torch.zeros(3)), ValueError, r"sinks: expected one logit per query head"),
}


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_input_leaves_the_cache_untouched(name, fmt):
    changes, error, message = BAD_CALLS[name]
    case = CacheCase(fmt, lq=4, batch_idx=True)
    inputs = make_cache_inputs(case)
    args = dict(q=inputs["q"], k_cache=inputs["k_cache"], v_cache=inputs["v_cache"], k=inputs["k"], v=inputs["v"],
                cache_seqlens=inputs["cache_seqlens"], cache_batch_idx=inputs["cache_batch_idx"])
    args.update(changes)
    if args["v_cache"] == "short":
        args["v_cache"] = mfa_hf.allocate_kv_cache(CACHE_ROWS, MAX_SEQLEN - 1, 2, 64, fmt)
    elif args["v_cache"] == "plain":
        args["v_cache"] = torch.zeros(CACHE_ROWS, MAX_SEQLEN, 2, 64)
    if isinstance(args["k"], str):
        args["k"] = torch.randn(BATCH, 4, 4, 64)
    before_k, before_v = _snapshot(inputs["k_cache"]), _snapshot(inputs["v_cache"])
    with pytest.raises(error, match=message):
        mfa_hf.flash_attn_with_kvcache(**args)
    _assert_untouched(inputs["k_cache"], before_k)
    _assert_untouched(inputs["v_cache"], before_v)


def test_plain_cache_dtype_and_batch_mismatch():
    q = torch.randn(2, 1, 4, 64)
    with pytest.raises(TypeError, match=r"k_cache: expected dtype torch.float32 like q, got torch.bfloat16"):
        mfa_hf.flash_attn_with_kvcache(q, torch.zeros(2, 8, 2, 64, dtype=torch.bfloat16),
                                       torch.zeros(2, 8, 2, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"k_cache: expected batch 2 like q \(or pass cache_batch_idx\), got 3"):
        mfa_hf.flash_attn_with_kvcache(q, torch.zeros(3, 8, 2, 64), torch.zeros(3, 8, 2, 64))
    with pytest.raises(ValueError, match=r"cache_seqlens: expected the valid lengths when appending k/v, got None"):
        mfa_hf.flash_attn_with_kvcache(q, torch.zeros(2, 8, 2, 64), torch.zeros(2, 8, 2, 64),
                                       torch.randn(2, 1, 2, 64), torch.randn(2, 1, 2, 64))


def test_equal_lengths_are_built_once_per_step_and_never_written():
    """Every layer of a decode step uses its plan's length vector (mfa_hf/decode_plan.py): one device
    tensor serves them all; int lengths given to flash_attn_with_kvcache are never written by its append."""
    from mfa_hf.decode_plan import DecodePlan

    q = torch.randn(2, 1, 4, 64)
    cache, v_cache = torch.randn(2, 16, 2, 64), torch.randn(2, 16, 2, 64)
    plan = DecodePlan(2, 1)
    first = plan._lengths_of(0, plan.groups[0], 9, q.device)
    assert plan._lengths_of(0, plan.groups[0], 9, q.device) is first
    assert plan._lengths_of(0, plan.groups[0], 10, q.device) is not first
    out = mfa_hf.flash_attn_with_kvcache(q, cache, v_cache, k=torch.randn(2, 1, 2, 64), v=torch.randn(2, 1, 2, 64),
                                         cache_seqlens=9)
    assert first.tolist() == [9, 9], "appending must not write the shared lengths"
    expected = mfa_hf.flash_attn_with_kvcache(q, cache, v_cache, cache_seqlens=torch.tensor([10, 10],
                                              dtype=torch.int32))
    torch.testing.assert_close(out, expected)


def test_int_lengths_from_many_threads():
    """8 threads x 50 calls with int cache_seqlens over many lengths: no error (a shared lengths memo once
    raised KeyError when two threads evicted the same entry; decode plans now own the vectors) and every
    answer is the one a single thread gets."""
    import sys
    import threading

    from mfa_hf import kvcache

    threads, calls, lengths = 8, 50, 13
    q, cache, v_cache = torch.randn(2, 1, 4, 16), torch.randn(2, 16, 2, 16), torch.randn(2, 16, 2, 16)
    want = {n: mfa_hf.flash_attn_with_kvcache(q, cache, v_cache, cache_seqlens=n) for n in range(1, lengths + 1)}
    barrier, errors, wrong = threading.Barrier(threads), [], []

    def work(t):
        barrier.wait()
        for i in range(calls):
            n = (t * 5 + i) % lengths + 1
            try:
                for j in range(20):  # the reuse cache alone, evicting all the time
                    kvcache._same_lengths(3, 100 + (t + i + j) % 17, q.device)
                if not torch.equal(mfa_hf.flash_attn_with_kvcache(q, cache, v_cache, cache_seqlens=n), want[n]):
                    wrong.append(n)
            except Exception as error:  # noqa: BLE001 -- reported below
                errors.append(repr(error))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up in a short run
    try:
        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors and not wrong, (errors[:3], wrong[:3])


@pytest.mark.parametrize("fmt", [None, "int8", "nf4"])
def test_append_under_compile_writes_what_eager_writes(fmt, monkeypatch):
    """The append's writes: plain eager calls index the caches directly (one set of indices for every write),
    compiled code goes through the mutating op mfa_hf::kvcache_append; both leave the same caches."""
    from mfa_hf import kvcache

    def caches():
        return [mfa_hf.allocate_kv_cache(2, 24, 2, 64, fmt) for _ in range(2)]

    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 3, 4, 64, generator=g)
    k, v = (torch.randn(2, 3, 2, 64, generator=g) for _ in range(2))
    lengths = torch.tensor([5, 9], dtype=torch.int32)
    op_calls = []
    op = kvcache._append
    monkeypatch.setattr(kvcache, "_append", lambda *a: op_calls.append(1) or op(*a))
    eager_k, eager_v = caches()
    eager = mfa_hf.flash_attn_with_kvcache(q, eager_k, eager_v, k, v, cache_seqlens=lengths)
    assert op_calls == []  # eager: no dispatcher
    compiled_k, compiled_v = caches()
    step = torch.compile(lambda q, k, v: mfa_hf.flash_attn_with_kvcache(q, compiled_k, compiled_v, k, v,
                                                                        cache_seqlens=lengths), fullgraph=True)
    torch.testing.assert_close(step(q, k, v), eager)
    assert op_calls  # traced through the op
    for got, want in zip(_snapshot(compiled_k) + _snapshot(compiled_v), _snapshot(eager_k) + _snapshot(eager_v)):
        assert torch.equal(got, want)


def _new_tokens(layout: str, shape, g) -> torch.Tensor:
    """New k or v (B, n, H, D) in an unusual layout: a (B, H, n, D) buffer seen token-major (what a model's
    cache update passes), a sliced wider head dim, or a batch broadcast from one row."""
    batch, count, heads, dim = shape
    if layout == "heads-first":
        return torch.randn(batch, heads, count, dim, generator=g).transpose(1, 2)
    if layout == "sliced-dim":
        return torch.randn(batch, count, heads, dim + 8, generator=g)[..., 4:dim + 4]
    if layout == "broadcast-batch":
        return torch.randn(1, count, heads, dim, generator=g).expand(batch, count, heads, dim)
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize("fmt, granularity", [(None, "token"), ("fp8_e4m3", "token"), ("fp8_e5m2", "token"),
                                              ("int8", "token"), ("nf4", "token"), ("int8", "channel"),
                                              ("fp8_e4m3", "head")])
@pytest.mark.parametrize("layout", ["contiguous", "heads-first", "sliced-dim", "broadcast-batch"])
@pytest.mark.parametrize("dim_v", [64, 32])
def test_append_at_a_host_position_writes_what_the_index_path_writes(fmt, granularity, layout, dim_v, monkeypatch):
    """append_kv and flash_attn_with_kvcache given an int length write slices, and K and V of one shape are
    encoded together; a (B,) length tensor takes the index path, one side at a time. Both leave the same caches
    (codes and scales bitwise), equal to quantizing the new tokens alone, and touch nothing else."""
    from mfa_hf import kvcache
    from mfa_hf.kvcache import append_kv

    indexed = []
    put = kvcache._put
    monkeypatch.setattr(kvcache, "_put", lambda *a: indexed.append(1) or put(*a))
    g = torch.Generator().manual_seed(17)
    batch, capacity, heads, dim = 2, 40, 2, 64
    if fmt is None and granularity != "token":
        pytest.skip("plain caches have no scales")
    k_all, v_all = torch.randn(batch, capacity, heads, dim, generator=g), torch.randn(batch, capacity, heads, dim_v,
                                                                                      generator=g)
    static, groups = {}, 32 if fmt == "nf4" else None  # nf4: groups that divide both head dims
    if granularity != "token":
        static = {side: mfa_hf.quantize_kv(x, fmt, granularity=granularity).scales
                  for side, x in (("k", k_all), ("v", v_all))}

    def caches():
        made = []
        for side, d in (("k", dim), ("v", dim_v)):
            fresh = mfa_hf.allocate_kv_cache(batch, capacity, heads, d, fmt, static_scales=static.get(side),
                                             group_size=groups)
            if fmt is None:
                fresh.normal_(generator=torch.Generator().manual_seed(5))  # old contents must survive
            made.append(fresh)
        return made

    by_int, by_tensor, by_call = caches(), caches(), caches()
    length = 0
    for count in (7, 1, 1, 5):  # a prefill, two decode steps, a chunk
        k = _new_tokens(layout, (batch, count, heads, dim), g)
        v = _new_tokens(layout, (batch, count, heads, dim_v), g)
        append_kv(*by_int, k, v, length)
        assert not indexed  # slices
        append_kv(*by_tensor, k, v, torch.full((batch,), length, dtype=torch.int32))
        assert indexed
        indexed.clear()
        if dim_v == dim:
            q = torch.randn(batch, count, 4, dim, generator=g)
            mfa_hf.flash_attn_with_kvcache(q, *by_call, k, v, cache_seqlens=length)
        for cache, new in zip(by_int, (k, v)):
            want = new if fmt is None else mfa_hf.quantize_kv(
                new.contiguous(), fmt, granularity=granularity, group_size=groups,
                scales=None if granularity == "token" else cache.scales)
            got = cache[:, length:length + count] if fmt is None else cache.codes[:, length:length + count]
            assert torch.equal(got, want if fmt is None else want.codes), (fmt, layout, count)
        length += count
    compared = (by_tensor, by_call) if dim_v == dim else (by_tensor,)
    for other in compared:
        for got, want in zip(_snapshot(by_int[0]) + _snapshot(by_int[1]), _snapshot(other[0]) + _snapshot(other[1])):
            assert torch.equal(got, want)
    if fmt is None:  # past the written prefix: what the caches held before
        untouched = caches()
        assert torch.equal(by_int[0][:, length:], untouched[0][:, length:])


@pytest.mark.parametrize("fmt", [None, "int8", "nf4"])
@pytest.mark.parametrize("shared", ["batch", "heads", "positions"])
def test_appending_into_a_cache_that_shares_memory_is_refused(fmt, shared):
    """An expanded or overlapping cache (rows, heads or positions on the same memory) would send one row's new token
    into another's keys: refused naming the cache, before anything is written. Reading it without appending is
    served and equals the reference."""
    from mfa_hf.kvcache import append_kv

    g = torch.Generator().manual_seed(21)
    batch, capacity, heads, dim = 2, 12, 2, 64

    def shared_view(t):
        if shared == "batch":
            return t[:1].expand(batch, *t.shape[1:])
        if shared == "heads":
            return t[:, :, :1].expand(*t.shape[:2], heads, t.shape[-1])
        return t.as_strided(t.shape, (t.stride(0), t.stride(2), t.stride(2), t.stride(3)))  # positions overlap heads

    def cache():
        made = mfa_hf.allocate_kv_cache(batch, capacity, heads, dim, fmt)
        if fmt is None:
            return shared_view(made.normal_(generator=g))
        filled = mfa_hf.quantize_kv(torch.randn(batch, capacity, heads, dim, generator=g), fmt)
        return mfa_hf.QuantizedKV(shared_view(filled.codes), filled.scales, filled.format, filled.group_size,
                                  filled.dtype)

    k_cache, v_cache = cache(), cache()
    before = _snapshot(k_cache) + _snapshot(v_cache)
    q = torch.randn(batch, 1, heads, dim, generator=g)
    k, v = (torch.randn(batch, 1, heads, dim, generator=g) for _ in range(2))
    lengths = torch.tensor([3, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"k_cache(\.codes)?: expected a cache whose elements do not share memory"):
        mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths)
    with pytest.raises(ValueError, match="do not share memory"):
        append_kv(k_cache, v_cache, k, v, 3)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(k_cache) + _snapshot(v_cache), before))
    out = mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)
    for b, length in enumerate(lengths.tolist()):
        keys, values = (dense(c)[b:b + 1, :length] for c in (k_cache, v_cache))
        ref, _ = attention_reference(q[b:b + 1].double(), keys.double(), values.double(), causal=True)
        base, _ = attention_reference(q[b:b + 1], keys, values, causal=True, upcast=False)
        assert_close_to_reference(out[b:b + 1], ref, base)


@pytest.mark.parametrize("fmt", [None, "int8", "nf4"])
@pytest.mark.parametrize("entry", ["flash_attn_with_kvcache", "append_kv"])
@pytest.mark.parametrize("fault", ["one tensor for k_cache and v_cache", "k_cache requires grad",
                                   "v_cache requires grad"])
def test_appends_refuse_caches_they_cannot_write_correctly(fmt, entry, fault):
    """The append writes caches in place: one tensor passed as both caches with different k and v (values would
    replace keys; with one new tensor for both the write is the same twice, and served) and, with
    grad mode on, a cache that requires grad (autograd cannot record the write) raise naming the argument and
    leave the caches untouched. The same caches are fine without an append, and under torch.no_grad()."""
    from mfa_hf.kvcache import append_kv

    g = torch.Generator().manual_seed(31)
    batch, capacity, heads, dim = 2, 8, 2, 64

    def cache():
        filled = torch.randn(batch, capacity, heads, dim, generator=g)
        return filled if fmt is None else mfa_hf.quantize_kv(filled, fmt)

    k_cache = cache()
    v_cache = k_cache if fault == "one tensor for k_cache and v_cache" else cache()
    graded = {"k_cache requires grad": k_cache, "v_cache requires grad": v_cache}.get(fault)
    if graded is not None:
        (graded if fmt is None else graded.scales).requires_grad_()  # codes are integers: the scales can
    before = _snapshot(k_cache) + _snapshot(v_cache)
    q = torch.randn(batch, 1, heads, dim, generator=g)
    k, v = (torch.randn(batch, 1, heads, dim, generator=g) for _ in range(2))
    expected = {"one tensor for k_cache and v_cache": r"v_cache(\.codes)?: expected memory apart from k_cache",
                "k_cache requires grad": r"k_cache(\.codes|\.scales)?: expected a cache that does not require grad",
                "v_cache requires grad": r"v_cache(\.codes|\.scales)?: expected a cache that does not require grad"}
    with pytest.raises(ValueError, match=expected[fault]):
        if entry == "append_kv":
            append_kv(k_cache, v_cache, k, v, 3)
        else:
            mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=3)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(k_cache) + _snapshot(v_cache), before))
    mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=3)  # no append: nothing written
    if fault == "one tensor for k_cache and v_cache":  # one new tensor for both: the same write twice, served
        if entry == "append_kv":
            append_kv(k_cache, v_cache, k, k, 3)
        else:
            mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, k, k, cache_seqlens=3)
        expected_cache = k if fmt is None else dense(mfa_hf.quantize_kv(k, fmt))
        torch.testing.assert_close(dense(k_cache)[:, 3:4], expected_cache, rtol=0, atol=0)
    if graded is not None:
        with torch.no_grad():
            mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=3)


@pytest.mark.parametrize("fmt", [None, "int8", "nf4"])
@pytest.mark.parametrize("lq", [1, 3])
def test_an_empty_batch_returns_empty_outputs(fmt, lq):
    """Batch 0, with and without an append and lse: empty outputs of the right shapes and dtypes (a reshape inside
    the decode failed before), as flash_attn_func gives."""
    q = torch.randn(0, lq, 4, 64)
    k_cache, v_cache = (mfa_hf.allocate_kv_cache(0, 16, 2, 64, fmt) for _ in range(2))
    new = torch.randn(0, lq, 2, 64)
    for extra in ({}, {"k": new, "v": new}):
        out, lse = mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.zeros(0, dtype=torch.int32),
                                                  return_lse=True, **extra)
        assert out.shape == (0, lq, 4, 64) and out.dtype == q.dtype
        assert lse.shape == (0, 4, lq) and lse.dtype == torch.float32


@pytest.mark.parametrize("fmt", [None, "int8"])
@pytest.mark.parametrize("grad_of", ["q", "sinks"])
def test_a_backward_through_a_decode_says_it_has_none(fmt, grad_of):
    """The decode op computes no gradients. Its forward is served with grad enabled (inference code often runs
    without no_grad); a backward through it raised torch's "no autograd formula was registered" error, and now
    says what has no backward and what to use instead."""
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 1, 4, 64, generator=g, requires_grad=grad_of == "q")
    sinks = torch.randn(4, generator=g, requires_grad=grad_of == "sinks")
    cache = [torch.randn(2, 16, 2, 64, generator=g) for _ in range(2)]
    if fmt:
        cache = [mfa_hf.quantize_kv(c, fmt) for c in cache]
    outs = [mfa_hf.flash_attn_with_kvcache(q, *cache, cache_seqlens=torch.tensor([5, 9], dtype=torch.int32),
                                           sinks=sinks)]
    if fmt and grad_of == "sinks":  # attention over quantized K/V through flash_attn_func
        outs.append(mfa_hf.flash_attn_func(q, *cache, sinks=sinks))
    for out in outs:
        with pytest.raises(RuntimeError, match="expected no backward through a decode"):
            out.sum().backward()


@pytest.mark.parametrize("fmt", [None, "int8", "fp8_e5m2", "nf4"])
@pytest.mark.parametrize("lengths, splits", [((5, 17), 0), ((13, 13), 3), ((0, 9), 2)])
@pytest.mark.parametrize("fused", [True, False])
def test_slots_past_each_rows_length_are_never_read(fmt, lengths, splits, fused, monkeypatch):
    """Slots at or past cache_seqlens[b] are not part of row b (an empty or reused cache holds any bits there):
    NaN in them, or NaN scales, must not reach the output. The torch decode loop loads key blocks up to the longest
    row (and padded splits past every row), and weight 0 times a NaN value was NaN for the whole shorter row."""
    monkeypatch.setattr(cpu_fused_decode, "ENABLED", fused)
    g = torch.Generator().manual_seed(31)
    q = torch.randn(2, 1, 4, 64, generator=g)
    k, v = (torch.randn(2, 24, 2, 64, generator=g) for _ in range(2))
    caches, valid = [], []
    for x in (k, v):
        if fmt is None:
            cache = x.clone()
            for b, length in enumerate(lengths):
                cache[b, length:] = float("nan")
            valid.append(x)
        else:
            cache = mfa_hf.quantize_kv(x, fmt)
            valid.append(cache.dequantize())
            for b, length in enumerate(lengths):
                cache.scales[b, length:] = float("nan")
        caches.append(cache)
    out = mfa_hf.flash_attn_with_kvcache(q, *caches, cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
                                         causal=False, num_splits=splits)
    for b, length in enumerate(lengths):
        keys, values = (x[b:b + 1, :length] for x in valid)
        ref, _ = attention_reference(q[b:b + 1].double(), keys.double(), values.double())
        base, _ = attention_reference(q[b:b + 1], keys, values, upcast=False)
        assert not bool(out[b].isnan().any()), (b, length)
        assert_close_to_reference(out[b:b + 1], ref, base)
