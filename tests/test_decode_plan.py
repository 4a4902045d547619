"""The decode plan (mfa_hf/decode_plan.py) and the two-part cache merge (kernels/merge.py) against the
float64 reference (DESIGN.md rule), on fresh random inputs with NaN-poisoned outputs (tests/conftest.py).

A two-part cache is a (quantized) prefix of P_b valid keys plus r full-precision residual keys; the
reference attends the dequantized prefix followed by the residual as one sequence."""

from __future__ import annotations

import itertools

import pytest
import torch

import mfa_hf
from mfa_hf import dispatch, trace
from mfa_hf.decode_plan import DecodePlan, LayerKV, group_rows
from mfa_hf.kernels.contract import CacheSide, DecodeCall, Options
from mfa_hf.kernels.merge import merge_partials
from mfa_hf.kernels.reference import attention_reference
from mfa_hf.kvcache import cache_side
from mfa_hf.testing import FORWARD_FACTOR, assert_close_to_reference

HQ, HKV, D = 4, 2, 32


def _reference_rows(q, keys, values, lengths, *, window, softcap, sinks, scale, dtype):
    """Per row b: q[b] over keys[b, :lengths[b]] (bottom-right aligned), float64 and plain-dtype results."""
    outs64, outs_low, lses = [], [], []
    for b, n in enumerate(lengths):
        options = dict(softmax_scale=scale, window_size=window, softcap=softcap, sinks=sinks)
        k, v = keys[b: b + 1, :n], values[b: b + 1, :n]
        out64, lse = attention_reference(q[b: b + 1].double(), k.double(), v.double(),
                                         **options | dict(sinks=None if sinks is None else sinks.double()))
        low, _ = attention_reference(q[b: b + 1].to(dtype), k.to(dtype), v.to(dtype), upcast=False, **options)
        outs64.append(out64), outs_low.append(low), lses.append(lse)
    return torch.cat(outs64), torch.cat(outs_low), torch.cat(lses)


def test_merge_partials_equals_attention_over_the_union():
    """Disjoint key sets (one of them invisible to some rows) merged by LSE, sinks joined once."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 3, HQ, D, generator=g), torch.randn(2, 20, HKV, D, generator=g), \
        torch.randn(2, 20, HKV, D, generator=g)
    sinks = torch.randn(HQ, generator=g)
    window = (6, 0)  # rows see only the last keys: the first part is empty for them
    full, full_lse = attention_reference(q.double(), k.double(), v.double(), window_size=window,
                                         sinks=sinks.double())
    mask = torch.zeros(2, HQ, 3, 20, dtype=torch.bool)
    parts = []
    for lo, hi in ((0, 9), (9, 15), (15, 20)):
        part_mask = mask.clone()
        part_mask[..., lo:hi] = True
        parts.append(attention_reference(q.double(), k.double(), v.double(), window_size=window,
                                         attn_mask=part_mask))
    out, lse = merge_partials(parts, sinks.double())
    torch.testing.assert_close(out, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, full_lse, rtol=1e-12, atol=1e-12)


def test_merge_of_empty_parts_gives_zero_and_the_sink():
    out = torch.zeros(1, 2, HQ, D)
    empty = torch.full((1, HQ, 2), -torch.inf)
    sinks = torch.randn(HQ)
    merged, lse = merge_partials([(out, empty), (out.clone(), empty.clone())], sinks)
    assert torch.equal(merged, out) and torch.equal(lse, sinks[None, :, None].expand(1, HQ, 2))
    merged, lse = merge_partials([(out, empty), (out.clone(), empty.clone())], None)
    assert torch.equal(merged, out) and bool(torch.isneginf(lse).all())


CASES = list(itertools.product(
    (None, "int8", "nf4"),  # prefix format
    (1, 3, 7),  # query rows
    # window (left, right), causal folded; left < r = 5: only the first lq - (r - left) rows reach the prefix
    ((-1, 0), (9, 0), (2, 0), (4, 0), (3, 2), (-1, -1)),
    (False, True),  # sinks
    (False, True),  # cache_batch_idx
))


@pytest.mark.parametrize("fmt, lq, window, sinks, batch_idx", CASES,
                         ids=[f"{f}-q{lq}-w{w[0]}_{w[1]}-{'sinks' if s else 'nosinks'}-{'rows' if r else 'dense'}"
                              for f, lq, w, s, r in CASES])
def test_two_part_decode_matches_the_reference_over_prefix_and_residual(fmt, lq, window, sinks, batch_idx):
    g = torch.Generator().manual_seed(hash((fmt, lq, window, sinks, batch_idx)) % 2**31)
    batch, cache_rows, capacity, r = 3, 4, 24, 5
    prefix_lengths = [17, 0, 9]
    rows = [2, 0, 3] if batch_idx else list(range(batch))
    rows_in_cache = cache_rows if batch_idx else batch
    k_prefix = torch.randn(rows_in_cache, capacity, HKV, D, generator=g)
    v_prefix = torch.randn(rows_in_cache, capacity, HKV, D, generator=g)
    k_res, v_res = (torch.randn(rows_in_cache, r, HKV, D, generator=g) for _ in range(2))
    q = torch.randn(batch, lq, HQ, D, generator=g)
    sink_logits = torch.randn(HQ, generator=g) if sinks else None
    group = {"group_size": 32} if fmt == "nf4" else {}
    keys, values = (k_prefix, v_prefix) if fmt is None else (mfa_hf.quantize_kv(k_prefix, fmt, **group),
                                                             mfa_hf.quantize_kv(v_prefix, fmt, **group))
    dense_k = keys if fmt is None else keys.dequantize(torch.float32)
    dense_v = values if fmt is None else values.dequantize(torch.float32)
    options = Options(D ** -0.5, *window)
    call = DecodeCall(q, cache_side(keys), cache_side(values), torch.tensor(prefix_lengths, dtype=torch.int32),
                      options, torch.tensor(rows, dtype=torch.int32) if batch_idx else None, sinks=sink_logits,
                      residual_keys=k_res, residual_values=v_res,
                      residual_lengths=torch.full((batch,), r, dtype=torch.int32))
    with trace.capture() as calls:
        out, lse = dispatch.backend("torch").ops.decode(call)
    prefix_seen = window[0] < 0 or lq - (r - window[0]) > 0  # else no query reaches back past the residual
    assert sum(n for key, n in calls.items() if key[1] == "decode") == (2 if prefix_seen else 1)
    for b, (row, n) in enumerate(zip(rows, prefix_lengths)):  # ragged: row b sees its own P_b + r keys
        joined_k = torch.cat([dense_k[row, :n], k_res[row]])[None]
        joined_v = torch.cat([dense_v[row, :n], v_res[row]])[None]
        ref64, low, ref_lse = _reference_rows(q[b: b + 1], joined_k, joined_v, [n + r], window=window, softcap=0.0,
                                              sinks=sink_logits, scale=D ** -0.5, dtype=torch.float32)
        assert_close_to_reference(out[b: b + 1], ref64, low, FORWARD_FACTOR, name=f"out row {b}")
        torch.testing.assert_close(lse[b: b + 1].double(), ref_lse, rtol=1e-4, atol=1e-4)


def test_plan_groups_left_padded_rows_and_dispatches_once_per_kind(monkeypatch):
    """Rows with equal padding share a group; the backend is chosen and the inputs checked once per kind
    of layer, and every layer of the step reuses the plan's length vectors."""
    g = torch.Generator().manual_seed(3)
    batch, total = 3, 12
    pads = [0, 4, 0]
    plan = DecodePlan(batch, 1, group_rows(pads, "cpu"))
    assert [group.pad for group in plan.groups] == [0, 4] and plan.groups[1].host_rows == (1,)
    selections = []
    select = dispatch.select
    monkeypatch.setattr(dispatch, "select", lambda problem: selections.append(problem) or select(problem))
    q = torch.randn(batch, 1, HQ, D, generator=g)
    layers = [torch.randn(batch, total, HKV, D, generator=g) for _ in range(4)]
    outs = [plan.run(q, LayerKV(CacheSide(k, None, "none", D), CacheSide(k, None, "none", D), total), scale=0.3)
            for k in layers]
    assert len(selections) == 2, "one dispatch per (group, kind of layer), not per layer"
    for k, out in zip(layers, outs):
        for b, pad in enumerate(pads):
            visible = k[b: b + 1, pad:]
            ref, _ = attention_reference(q[b: b + 1].double(), visible.double(), visible.double(), softmax_scale=0.3,
                                         causal=True)
            torch.testing.assert_close(out[b: b + 1].double(), ref, rtol=1e-5, atol=1e-5)


def test_plan_refuses_a_row_that_sees_no_key():
    plan = DecodePlan(2, 1, group_rows([0, 5], "cpu"))
    k = torch.randn(2, 5, HKV, D)
    with pytest.raises(ValueError, match=r"attention_mask: a row sees none of its 5 keys \(padding 5\)"):
        plan.run(torch.randn(2, 1, HQ, D), LayerKV(CacheSide(k, None, "none", D), CacheSide(k, None, "none", D), 5),
                 scale=0.25)


def test_plan_checks_inputs_once_with_clear_errors():
    plan = DecodePlan(2, 1)
    k = torch.randn(2, 5, HKV, D + 1)
    with pytest.raises(ValueError, match=r"k_cache: expected head dim 32 like q, got 33"):
        plan.run(torch.randn(2, 1, HQ, D), LayerKV(CacheSide(k, None, "none", D + 1), CacheSide(k, None, "none", D + 1), 5),
                 scale=0.25)
