"""The torch backend's fused CPU decode (kernels/torch/cpu_fused_decode.py) against the float64 reference.

It serves one query row per sequence with equal cache lengths and no ALiBi/softcap; every case here
checks that it served (or, for the calls it must refuse, that the loop did), across formats (plain,
FP8, INT8, NF4, mixed K/V), dtypes, GQA/MQA/MHA, windows, sinks, empty ranges, NaN rows and key
ranges cut into many chunks (a tiny CHUNK_BYTES: the chunks merge by their log-sum-exps).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import mfa_hf
from mfa_hf.kernels.torch import cpu_fused_decode
from mfa_hf.testing_kvcache import (
    BATCH,
    FORMATS,
    DecodeCase,
    assert_matches_reference_over_cache,
    assert_path_switch_agrees,
    assert_served_and_matches_reference,
    make_decode_inputs,
    record_calls,
    run_kvcache,
)

CAPACITY = 80


@pytest.fixture
def served(monkeypatch):
    """Counts the calls the fused path computed (the length of each)."""
    return record_calls(monkeypatch, cpu_fused_decode, "decode", lambda call, length: length)


def _cases():
    windows = ((-1, -1), (9, -1), (0, -1), (200, 3))
    heads = ((4, 2), (4, 1), (3, 3), (8, 2))
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    cases = []
    for n, fmt in enumerate(FORMATS):
        for m in range(3):
            i = n + m
            cases.append(DecodeCase(fmt, 1, dtypes[i % 3], heads[i % 4], window=windows[i % 4], sinks=bool(i % 2)))
    cases.append(DecodeCase("int8", 1, torch.bfloat16, (4, 2), v_format="nf4", sinks=True))
    cases.append(DecodeCase("fp8_e5m2", 1, torch.float32, (4, 2), dim=96, v_format="int8"))
    for i, fmt in enumerate(FORMATS):  # a row map (cache_batch_idx): rows read other cache rows, out of order
        cases.append(DecodeCase(fmt, 1, dtypes[i % 3], heads[i % 4], window=windows[(i + 1) % 4], sinks=bool(i % 2),
                                batch_idx=True))
    return cases


@pytest.mark.parametrize("chunk_bytes", [cpu_fused_decode.CHUNK_BYTES, 4096], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.id)
def test_matches_reference(case, chunk_bytes, served, monkeypatch):
    monkeypatch.setattr(cpu_fused_decode, "CHUNK_BYTES", chunk_bytes)
    assert_served_and_matches_reference(case, CAPACITY, lambda: served[-1] if served else None, "fused path")


def test_equals_the_block_loop(monkeypatch):
    """Same inputs through the fused path and through decode.py's loop agree to fp32 rounding."""
    case = DecodeCase("nf4", 1, torch.float32, (8, 2), window=(30, -1), sinks=True)
    assert_path_switch_agrees(lambda enabled: monkeypatch.setattr(cpu_fused_decode, "ENABLED", enabled), case,
                              length=63, capacity=CAPACITY)


@pytest.mark.parametrize("case", [
    DecodeCase("int8", 1, heads=(4, 2), softcap=4.0),
    DecodeCase("int8", 1, heads=(4, 2), alibi=True),
    DecodeCase("int8", 3, heads=(4, 2)),
], ids=lambda c: c.id)
def test_other_calls_take_the_loop(case, served):
    inputs = make_decode_inputs(case, (20,) * BATCH, CAPACITY)
    out, lse = run_kvcache(case, inputs)
    assert not served
    assert_matches_reference_over_cache(case, inputs, out, lse)


@pytest.mark.parametrize("rows", [(1, 2, 3), (2, 3, 0), (3, 2, 1), (4, 0, 1)])
@pytest.mark.parametrize("fmt, granularity", [("int8", "token"), ("nf4", None), ("fp8_e4m3", "head"), (None, None)])
def test_row_maps_read_their_cache_rows(rows, fmt, granularity, served):
    """Consecutive cache rows are read as one run (a view), others run by run; scales of one
    batch row (broadcast to every cache row) stay whole. Each result is the reference's for the row's cache row."""
    from mfa_hf.quant import QuantizedKV

    case = DecodeCase(fmt, 1, torch.float32, (4, 2), window=(12, -1), sinks=True, batch_idx=True)
    inputs = make_decode_inputs(case, (30,) * BATCH, CAPACITY)
    inputs["cache_batch_idx"] = torch.tensor(rows, dtype=torch.int32)
    if granularity is not None:
        for name in ("k_cache", "v_cache"):
            cache = mfa_hf.quantize_kv(inputs[name].dequantize(), fmt, granularity=granularity)
            if granularity == "head":  # one batch row of scales for every cache row (broadcast)
                cache = QuantizedKV(cache.codes, cache.scales[:1], cache.format, cache.group_size, cache.dtype)
            inputs[name] = cache
    out, lse = run_kvcache(case, inputs)
    assert served == [31]
    assert_matches_reference_over_cache(case, inputs, out, lse)


def test_ragged_lengths_take_the_loop(served):
    case = DecodeCase("fp8_e4m3", 1, heads=(4, 1))
    inputs = make_decode_inputs(case, (0, 17, 40), CAPACITY)
    out, lse = run_kvcache(case, inputs)
    assert not served
    assert_matches_reference_over_cache(case, inputs, out, lse)


@pytest.mark.parametrize("fmt", ["int8", None])
def test_a_nan_query_row_stays_nan(fmt, served):
    """torch's fused CPU kernel zeroes a NaN query row; ours keeps it NaN (the loop serves that call)."""
    case = DecodeCase(fmt, 1, heads=(4, 2))
    inputs = make_decode_inputs(case, (30,) * BATCH, CAPACITY)
    inputs["q"][1, 0, 2, 5] = float("nan")
    out, _ = run_kvcache(case, inputs)
    assert not served
    assert bool(out[1, 0, 2].isnan().all()) and bool(torch.isfinite(out[0]).all())


def test_nan_in_a_key_reaches_every_query_that_sees_it(served):
    case = DecodeCase(None, 1, heads=(4, 2))
    inputs = make_decode_inputs(case, (30,) * BATCH, CAPACITY)
    inputs["k_cache"][2, 7, 1, 3] = float("nan")
    out, _ = run_kvcache(case, inputs)
    assert served
    assert bool(out[2, 0, 2:4].isnan().all()) and bool(torch.isfinite(out[2, 0, :2]).all())
    assert bool(torch.isfinite(out[:2]).all())


def test_a_row_without_visible_keys_is_zero_with_its_sink(served):
    """No key at all (length 0, no append): out 0 and lse the sink's logit, or -inf without sinks."""
    q = torch.randn(2, 1, 4, 32)
    cache, v_cache = (mfa_hf.allocate_kv_cache(2, 16, 2, 32, "int8") for _ in range(2))
    lengths = torch.zeros(2, dtype=torch.int32)
    sinks = torch.randn(4)
    for sink in (None, sinks):
        out, lse = mfa_hf.flash_attn_with_kvcache(q, cache, v_cache, cache_seqlens=lengths, sinks=sink,
                                                 return_lse=True)
        assert torch.equal(out, torch.zeros_like(out))
        want = torch.full_like(lse, -torch.inf) if sink is None else sinks[None, :, None].expand_as(lse)
        torch.testing.assert_close(lse, want)
    assert served == [0, 0]


def _unit_stride_broken(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values with a last dim that is not unit-stride: every other element of a wider buffer, every
    stride reversed, or one value broadcast along it (stride 0)."""
    if how == "sliced":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if how == "permuted":
        return t.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    return t[..., :1].expand(t.shape)


@pytest.mark.parametrize("how", ["sliced", "permuted", "broadcast"])
@pytest.mark.parametrize("which", ["q", "k_codes", "v_codes", "k_scales"])
@pytest.mark.parametrize("fmt, granularity", [("int8", "channel"), ("nf4", None), ("fp8_e4m3", "token"),
                                               ("int8", "token")])
def test_quantized_kv_of_any_layout_on_the_fused_path(fmt, granularity, which, how, served):
    """flash_attn_func over QuantizedKV with one query row reaches the fused path; whatever the layout of q, of the
    codes or of the scales, the result is the reference's over the same codes (the aten kernel reads the last dim
    as unit-stride). A broadcast changes the values: the reference dequantizes the same broadcast tensors."""
    from mfa_hf.kernels.reference import attention_reference
    from mfa_hf.quant import QuantizedKV

    g = torch.Generator().manual_seed(len(which) + len(how))
    q = torch.randn(2, 1, 4, 64, generator=g)
    k, v = (torch.randn(2, 9, 2, 64, generator=g) for _ in range(2))
    kq = mfa_hf.quantize_kv(k, fmt, **({"granularity": granularity} if granularity else {}))
    vq = mfa_hf.quantize_kv(v, fmt)
    if which == "q":
        q = _unit_stride_broken(q, how)
    elif which == "k_scales":
        kq = QuantizedKV(kq.codes, _unit_stride_broken(kq.scales, how), kq.format, kq.group_size, kq.dtype)
    else:
        side = kq if which == "k_codes" else vq
        side = QuantizedKV(_unit_stride_broken(side.codes, how), side.scales, side.format, side.group_size, side.dtype)
        kq, vq = (side, vq) if which == "k_codes" else (kq, side)
    ref, _ = attention_reference(q.double(), kq.dequantize(torch.float64), vq.dequantize(torch.float64))
    out = mfa_hf.flash_attn_func(q, kq, vq)
    assert served, "the fused path did not serve"
    assert (out.double() - ref).abs().max() < 1e-5
