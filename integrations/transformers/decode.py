"""Decode steps for the attention functions: read the mask, get the step's plan, run it.

This module interprets transformers' inputs (which rows are left-padded, what the cache handles
hold); the attention itself is the decode plan's (mfa_hf/decode_plan.py: built once per step, run by
every layer) and the kernels package's (the merge of a quantized prefix with its full-precision
residual, the sinks, the window arithmetic). Two entry points, both returning (B, Lq, Hq, Dv):

- `quantized_attention`: K/V are `QuantizedCacheView` handles from MFAQuantizedCache: the quantized
  store (codes + scales, read block by block by the decode op) and the full-precision residual.
  No dequantized copy.
- `plain_decode` / `padded_plain_decode`: a small query (Lq <= DECODE_MAX_Q) against plain cached
  K/V, with no mask or a 2-D key mask the plan can express, as the cache tensors are (no copy).

Left padding (batched generate) is expressed without a mask: rows with equal padding form one group
of the plan, whose window's left edge stops at the row's first real key.
"""

from __future__ import annotations

import torch

from ... import native, ops, trace
from ...decisions import Decisions, steering_environment
from ...decode_plan import DecodePlan, LayerKV, group_rows
from ...kernels.contract import CacheSide
from ...kvcache import cache_side
from ...native_table import DECODE_ROWS
from .cache_view import QuantizedCacheView
from .step import once_per_mask

DECODE_MAX_Q = DECODE_ROWS  # query lengths up to this are "decode" (speculative / assisted steps included)


def is_cache_view(x) -> bool:
    return isinstance(x, QuantizedCacheView)


def _padding_pattern(valid: torch.Tensor):
    """(pads (B,), is_left_padding): p_b leading False keys, and whether every row is p_b False then True."""
    pads = (~valid).sum(dim=1)
    left_padded = valid == (torch.arange(valid.shape[-1], device=valid.device)[None, :] >= pads[:, None])
    return pads, left_padded.all()


def _left_pads(attention_mask, batch: int, total: int, q_len: int) -> torch.Tensor:
    """Padding keys at the start of each row (B,) from a 2-D key mask, or from a dense mask of one query row
    (a pattern transformers could not give compactly: a chunked layer's, a VLM's image-token union); other
    patterns are refused."""
    if attention_mask.dim() == 4 and attention_mask.shape[1] == attention_mask.shape[2] == 1 and q_len == 1:
        attention_mask = _row_as_key_validity(attention_mask[:, 0, 0])
    if attention_mask.dim() != 2:
        raise NotImplementedError(
            "MFAQuantizedCache: expected no mask, a 2-D key-padding mask or one query row's dense mask at decode, "
            f"got a {attention_mask.dim()}-D mask of shape {tuple(attention_mask.shape)} (a pattern the decode kernel "
            "cannot express).")
    valid = attention_mask[:, -total:].bool()
    if valid.shape[-1] < total:  # a compact mask shorter than the keys: the tail is invalid
        raise NotImplementedError(
            f"MFAQuantizedCache: expected a key mask of length {total}, got {valid.shape[-1]} (an encoder-decoder "
            "model given one cache stores its cross-attention K/V in the same layers: pass "
            "EncoderDecoderCache(MFAQuantizedCache(...), DynamicCache()))")
    pads, left_padded = _padding_pattern(valid)
    if not bool(left_padded):
        raise NotImplementedError("MFAQuantizedCache: expected left padding (False then True per row) in the key "
                                  "mask, got padding elsewhere")
    if q_len > 1 and bool((pads > 0).any()):
        raise NotImplementedError(f"MFAQuantizedCache: padded rows with {q_len} query tokens against a quantized "
                                  "cache are not supported (one token per step is)")
    return pads


def _row_as_key_validity(row: torch.Tensor) -> torch.Tensor:
    """A dense mask's only query row (B, L) as key validity (_visible_keys), refused where it holds a bias."""
    visible = _visible_keys(row)
    if visible is None:
        raise NotImplementedError("MFAQuantizedCache: expected a decode step's additive mask to hold only 0 and "
                                  "masking values, got a finite bias (a pattern the decode kernel cannot express).")
    return visible


def _visible_keys(row: torch.Tensor) -> torch.Tensor | None:
    """A dense mask's only query row (B, L) as key validity: bool as it is; an additive row only when it holds
    nothing but 0 (visible) and masking values (-inf or below half the dtype's minimum), else None: a finite
    bias is not a key mask."""
    if row.dtype == torch.bool:
        return row
    visible = row == 0
    return visible if bool((visible | (row <= torch.finfo(row.dtype).min / 2)).all()) else None


def _window_left(sliding_window: int | None, total: int) -> int:
    """transformers' sliding window counts the current token: keys at distance < window are visible."""
    return sliding_window - 1 if sliding_window is not None and sliding_window < total + 1 else -1


def _quantized_plan(key: QuantizedCacheView, attention_mask, batch: int, q_len: int, device) -> DecodePlan:
    """The step's plan: on the step's mask (its padding read once), or on the cache's step holder."""
    total = key.shape[2]
    if attention_mask is None:
        return key.step_plans.get((key.step, batch, q_len, device), lambda: DecodePlan(batch, q_len))
    return once_per_mask(attention_mask, ("decode plan", batch, total, q_len), lambda: DecodePlan(
        batch, q_len, group_rows(_left_pads(attention_mask, batch, total, q_len).tolist(), attention_mask.device)))


def quantized_attention(module, query, key: QuantizedCacheView, value: QuantizedCacheView, attention_mask, *,
                        scaling=None, sliding_window=None, softcap=None, s_aux=None, causal: bool):
    """query (B, Hq, Lq, D) over quantized handles -> (B, Lq, Hq, Dv)."""
    if not (is_cache_view(key) and is_cache_view(value)):
        raise TypeError(f"MFAQuantizedCache: expected K and V handles, got {type(key).__name__} and "
                        f"{type(value).__name__}")
    q = query.transpose(1, 2)
    plan = _quantized_plan(key, attention_mask, q.shape[0], q.shape[1], q.device)
    stored = key.quantized is not None and key.length > 0
    layer = LayerKV(
        keys=cache_side(key.quantized) if stored else None, values=cache_side(value.quantized) if stored else None,
        length=key.length if stored else 0,
        residual=None if key.residual is None else (key.residual.transpose(1, 2), value.residual.transpose(1, 2)))
    if layer.keys is None and layer.residual is None:
        raise ValueError("MFAQuantizedCache: the layer holds no keys")
    if sliding_window is None:  # a model that leaves the window to the cache's trimming (Moshi): the layer's own
        sliding_window = key.window
    return plan.run(q, layer, scale=_scale(scaling, q), window_left=_window_left(sliding_window, key.shape[2]),
                    causal=causal, softcap=softcap or 0.0, sinks=None if s_aux is None else s_aux.float())


def _scale(scaling, q) -> float:
    return q.shape[-1] ** -0.5 if scaling is None else scaling


def _plain_layer(key, value, length: int) -> LayerKV:
    k, v = key.transpose(1, 2), value.transpose(1, 2)  # (B, S, Hkv, D) views: no copy
    return LayerKV(CacheSide(k, None, "none", k.shape[-1]), CacheSide(v, None, "none", v.shape[-1]), length)


# A kind of unmasked plain decode layer (shapes, strides, dtypes, device, options, steering environment) whose plan
# found the platform's kernel exact -> that call in transformers' own heads-first layout. The other layers of the
# step (same kind) skip the plan, its layer objects and six transposes: a decode layer's host time on CPU is
# about that of torch's kernel at 1k keys. Bounded like the plan's own decisions.
_native_kinds = Decisions()


def _native_kind(query, key, value, scaling, sliding_window, softcap):
    return (query.shape, query.stride(), query.dtype, query.device, key.shape, key.stride(), key.dtype,
            value.shape, value.stride(), value.dtype, scaling, sliding_window, softcap, steering_environment())


def plain_decode(query, key, value, *, scaling=None, sliding_window=None, softcap=None, s_aux=None):
    """A small, unmasked query against plain cached K/V (B, Hkv, S, D) -> (B, Lq, Hq, D). No mask carries
    a step here, so the plan (a length vector, the backend) is this layer's own."""
    kind = None
    if s_aux is None:
        kind = _native_kind(query, key, value, scaling, sliding_window, softcap)
        route = _native_kinds.get(kind)
        if route is not None and not trace.enabled() and not torch.compiler.is_compiling() and ops.eager_context():
            # eager and no grad (the caller's decode conditions): q may be read on the host where it is on the CPU
            return native.sdpa_heads_first(query, key, value, None, route, _scale(scaling, query),
                                           readable=query.device.type == "cpu").transpose(1, 2)
    q, total = query.transpose(1, 2), key.shape[2]
    plan = DecodePlan(q.shape[0], q.shape[1])
    out = plan.run(q, _plain_layer(key, value, total), scale=_scale(scaling, q),
                   window_left=_window_left(sliding_window, total), causal=True, softcap=softcap or 0.0,
                   sinks=None if s_aux is None else s_aux.float())
    if kind is not None and plan.native_route is not None:
        _native_kinds.keep(kind, plan.native_route)
    return out


def _plain_plan(valid: torch.Tensor, q_len: int, device=None) -> DecodePlan | None:
    """The plan for a 2-D key mask the decode op can express for plain K/V, else None (its row groups on `device`,
    default the mask's)."""
    pads, left_padded = _padding_pattern(valid)
    if not bool(left_padded):
        return None
    values = pads.tolist()
    if (q_len > 1 and any(values)) or max(values) >= valid.shape[-1]:  # per-query-row edges; a row with no key
        return None
    return DecodePlan(valid.shape[0], q_len, group_rows(values, valid.device if device is None else device))


def _dense_row_span(row: torch.Tensor) -> tuple[int, DecodePlan] | None:
    """A dense mask's only query row (B, S) (a compileable cache's decode step: the buffer's fixed size, window and
    padding applied) as (length, plan) when each row's visible keys are one run [pad_b, length) ending at the same
    key for every row (the query's own: the slots after it are the buffer's unwritten ones), else None. Read on
    the host in one transfer (a sync on mps/cuda, once per step: the plan lives on the mask)."""
    host = _visible_keys(row.cpu())
    if host is None:
        return None
    seen = host.any(dim=0)
    if not bool(seen.any()):
        return None
    length = int(seen.nonzero().max()) + 1
    if bool(host[:, length:].any()) or not bool(host[:, length - 1].all()):
        return None
    plan = _plain_plan(host[:, :length], 1, row.device)
    return None if plan is None else (length, plan)


def padded_plain_decode(query, key, value, attention_mask, *, scaling=None, sliding_window=None, softcap=None,
                        s_aux=None):
    """A small query against plain cached K/V (B, Hkv, S, D) with a 2-D key mask -> (B, Lq, Hq, D), or None.

    Left padding (batched generate) and unfilled slots after the mask's length (a StaticCache's buffer)
    become each row's visible key range: the plan's length = the mask's length and a left window ending
    at the row's first real key, rows of equal padding in one call through cache_batch_idx. No copy of
    K/V (transformers' flash path would unpad, i.e. gather, them per layer). The mask is read once per
    step (the plan lives on it). A dense mask of one query row over the whole buffer (masks.py gives one
    to a compileable cache's decode steps, at a fixed size for the compiled step) is read the same way
    when not compiling: its visible run [pad_b, length) already holds the window. None for any other
    pattern: the caller takes its general path.
    """
    if torch.compiler.is_compiling():
        return None
    q_len, total = query.shape[2], key.shape[2]
    if attention_mask.dim() == 4 and attention_mask.shape[1:3] == (1, 1) and q_len == 1 \
            and attention_mask.shape[-1] == total:
        found = once_per_mask(attention_mask, ("dense row plan", total), lambda: _dense_row_span(attention_mask[:, 0, 0]))
        if found is None:
            return None
        length, plan = found
        sliding_window = None  # the row holds it, aligned at the query's own key
    elif attention_mask.dim() == 2:
        valid = attention_mask[:, -total:]  # a sliding layer's buffer holds the last `total` keys
        length = valid.shape[-1]  # keys past it: a static cache's unfilled slots
        if length < q_len:
            return None
        plan = once_per_mask(attention_mask, ("plain decode plan", total, q_len),
                             lambda: _plain_plan(valid.bool(), q_len))
        if plan is None:
            return None
    else:
        return None
    q = query.transpose(1, 2)
    return plan.run(q, _plain_layer(key, value, length), scale=_scale(scaling, q),
                    window_left=_window_left(sliding_window, length), causal=True, softcap=softcap or 0.0,
                    sinks=None if s_aux is None else s_aux.float())
