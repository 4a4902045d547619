"""Decode steps on mfa-hf's decode op (`flash_attn_with_kvcache`), for the attention functions.

Two entry points, both returning (B, Lq, Hq, Dv) like transformers' attention functions:

- `quantized_attention`: K/V are `QuantizedCacheView` handles from MFAQuantizedCache. What the
  kernel sees per step: part A, the quantized store (codes + scales, read block by block by the
  decode op; `cache_seqlens` = the valid prefix), and part B, the full-precision residual (only
  with `residual_length > 0`), attended by the same op. The two partial results are merged by
  their log-sum-exps; sinks (GPT-OSS) are applied once, after the merge. No dequantized copy.
- `plain_decode`: a small query (Lq <= DECODE_MAX_Q) against plain cached K/V with no mask goes to
  the same decode op with the cache tensors as given (a (B, S, H, D) view, no copy).

Left padding (batched generate) is expressed without a mask: for a decode row that starts after
`p` padding keys, the window's left edge is moved to key p; rows with equal padding share a call.
"""

from __future__ import annotations

import torch

from ... import kvcache
from .cache_view import QuantizedCacheView
from .mask_memo import once_per_mask

DECODE_MAX_Q = 16  # query lengths up to this are "decode" (speculative / assisted steps included)


def is_cache_view(x) -> bool:
    return isinstance(x, QuantizedCacheView)


def _padding_pattern(valid: torch.Tensor):
    """(pads (B,), is_left_padding): p_b leading False keys, and whether every row is p_b False then True."""
    pads = (~valid).sum(dim=1)
    left_padded = valid == (torch.arange(valid.shape[-1], device=valid.device)[None, :] >= pads[:, None])
    return pads, left_padded.all()


def _left_pads(attention_mask, batch: int, total: int, q_len: int) -> torch.Tensor:
    """Padding keys at the start of each row (B,) from a 2-D key mask; other patterns are refused."""
    if attention_mask.dim() != 2:
        raise NotImplementedError(
            f"MFAQuantizedCache: expected no mask or a 2-D key-padding mask at decode, got a {attention_mask.dim()}-D "
            "mask (a pattern the decode kernel cannot express).")
    valid = attention_mask[:, -total:].bool()
    if valid.shape[-1] < total:  # a compact mask shorter than the keys: the tail is invalid
        raise NotImplementedError(f"MFAQuantizedCache: expected a key mask of length {total}, got {valid.shape[-1]}")
    pads, left_padded = _padding_pattern(valid)
    if not bool(left_padded):
        raise NotImplementedError("MFAQuantizedCache: expected left padding (False then True per row) in the key "
                                  "mask, got padding elsewhere")
    if q_len > 1 and bool((pads > 0).any()):
        raise NotImplementedError(f"MFAQuantizedCache: padded rows with {q_len} query tokens against a quantized "
                                  "cache are not supported (one token per step is)")
    return pads


PadGroups = list  # [(pad, rows)]: rows (int32 device tensor, host list) sharing `pad` padding keys; None = all


def _pad_groups(attention_mask, batch: int, total: int, q_len: int) -> PadGroups:
    """Rows grouped by left padding; without a mask one group of every row, nothing read from the device.
    With a mask, one analysis per mask object (mask_memo): the first layer of a step reads it."""
    if attention_mask is None:
        return [(0, None)]
    return once_per_mask(attention_mask, ("left pads", batch, total, q_len),
                         lambda: _group_rows(_left_pads(attention_mask, batch, total, q_len).tolist(),
                                             attention_mask.device))


def _group_rows(pads: list[int], device) -> PadGroups:
    if len(set(pads)) == 1:
        return [(pads[0], None)]
    groups = []
    for pad in sorted(set(pads)):
        host = [b for b, p in enumerate(pads) if p == pad]
        groups.append((pad, (torch.tensor(host, dtype=torch.int32, device=device), host)))
    return groups


def _over_pad_groups(groups: PadGroups, q, attend) -> tuple:
    """attend(q_rows, rows, pad) -> a tuple of batch-first tensors, for each group of rows, reassembled
    in batch order; a single group is one call over the whole batch (rows None)."""
    if len(groups) == 1:  # no padding, or the same for every row
        return attend(q, None, groups[0][0])
    results = None
    for pad, rows in groups:
        parts = attend(q.index_select(0, rows[0]), rows, pad)
        if results is None:
            results = tuple(part.new_empty((q.shape[0],) + part.shape[1:]) for part in parts)
        for full, part in zip(results, parts):
            full[rows[0]] = part
    return results


def _part(q, k_side, v_side, seqlens, rows, left, right, causal, scale, softcap):
    """One partial attention via the decode op: (out (B, Lq, Hq, D), lse (B, Hq, Lq)). rows: None or
    (device tensor, its host values), so that nothing is read back from the device."""
    return kvcache.attend_kvcache(
        q, k_side, v_side, cache_seqlens=seqlens, cache_batch_idx=None if rows is None else rows[0],
        host_batch_idx=None if rows is None else rows[1], softmax_scale=scale, causal=causal,
        window_size=(left, right), softcap=softcap or 0.0, return_lse=True)


def _merge(parts):
    """Combine partial attentions over disjoint key sets by their log-sum-exps."""
    if len(parts) == 1:
        return parts[0]
    (out_a, lse_a), (out_b, lse_b) = parts
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    weight_a = torch.exp(lse_a.float() - lse).nan_to_num(0.0).transpose(1, 2)[..., None]
    weight_b = torch.exp(lse_b.float() - lse).nan_to_num(0.0).transpose(1, 2)[..., None]
    out = out_a.float() * weight_a + out_b.float() * weight_b
    return out.to(out_a.dtype), lse


def _apply_sinks(out, lse, sinks):
    """softmax over [scores, sink]: scale the sink-free result by exp(lse) / (exp(lse) + exp(sink))."""
    keep = torch.sigmoid(lse.float() - sinks.float()[None, :, None])  # (B, Hq, Lq)
    return (out.float() * keep.transpose(1, 2)[..., None]).to(out.dtype)


SKIP = None  # a part no query row can see


def _left(window_left: int, pad_limit: int | None):
    """Left span for a part: the window's (-1 none) capped by padding (keys visible left of the query);
    SKIP when nothing is visible."""
    if pad_limit is not None and pad_limit < 0:
        return SKIP
    if pad_limit is None:
        return window_left
    return pad_limit if window_left < 0 else min(window_left, pad_limit)


def _prefix_left(window_left: int, residual: int, prefix: int, pad: int, q_len: int):
    # Part A is attended as if its last key were the query's; the real query sits `residual` keys
    # later, so the window's left span shrinks by `residual`.
    shifted = window_left
    if window_left >= 0:
        shifted = window_left - residual
        if shifted < 0:
            if q_len > 1:
                raise NotImplementedError("MFAQuantizedCache: a sliding window shorter than the residual with "
                                          f"{q_len} query tokens is not supported")
            return SKIP
    return _left(shifted, prefix - 1 - pad if pad else None)


def _row_group(q, key, value, rows, pad, window_left, causal, scale, softcap):
    """Attention of the rows `rows` (all with `pad` padding keys; (device tensor, host list), or None for
    every row) over the quantized part + residual. Lengths go to the decode op as host ints and rows with
    their host values: nothing is read back from the device."""
    prefix, residual, q_len = key.length, key.residual_length, q.shape[1]
    parts = []
    if prefix:
        left = _prefix_left(window_left, residual, prefix, pad, q_len)
        if left is not SKIP:
            # With a residual every prefix key precedes every query (the residual holds the new
            # tokens), so part A needs no causal mask.
            parts.append(_part(q, key.quantized, value.quantized, prefix, rows, left, -1,
                               causal and not residual, scale, softcap))
    if residual:
        left = _left(window_left, residual - 1 - (pad - prefix) if pad > prefix else None)
        if left is not SKIP:
            sides = (key.residual, value.residual) if rows is None else (
                key.residual.index_select(0, rows[0]), value.residual.index_select(0, rows[0]))
            k_res, v_res = (side.transpose(1, 2) for side in sides)
            parts.append(_part(q, k_res, v_res, None, None, left, -1, causal, scale, softcap))
    if not parts:
        raise ValueError(f"MFAQuantizedCache: a row sees none of its {prefix + residual} keys (padding {pad})")
    return _merge(parts)


def quantized_attention(module, query, key: QuantizedCacheView, value: QuantizedCacheView, attention_mask, *,
                        scaling=None, sliding_window=None, softcap=None, s_aux=None, causal: bool):
    """query (B, Hq, Lq, D) over quantized handles -> (B, Lq, Hq, Dv)."""
    if not (is_cache_view(key) and is_cache_view(value)):
        raise TypeError(f"MFAQuantizedCache: expected K and V handles, got {type(key).__name__} and "
                        f"{type(value).__name__}")
    q = query.transpose(1, 2)
    batch, q_len, total = q.shape[0], q.shape[1], key.shape[2]
    groups = _pad_groups(attention_mask, batch, total, q_len)
    window_left = sliding_window - 1 if sliding_window is not None and sliding_window < total + 1 else -1
    out, lse = _over_pad_groups(groups, q, lambda q_rows, rows, pad: _row_group(
        q_rows, key, value, rows, pad, window_left, causal, scaling, softcap))
    return out if s_aux is None else _apply_sinks(out, lse, s_aux)


def plain_decode(query, key, value, *, scaling=None, sliding_window=None, softcap=None, s_aux=None):
    """A small, unmasked query against plain cached K/V (B, Hkv, S, D) on the decode op -> (B, Lq, Hq, D)."""
    total = key.shape[2]
    window_left = sliding_window - 1 if sliding_window is not None and sliding_window < total + 1 else -1
    return kvcache.flash_attn_with_kvcache(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), softmax_scale=scaling, causal=True,
        window_size=(window_left, 0 if window_left >= 0 else -1), softcap=softcap or 0.0,
        sinks=None if s_aux is None else s_aux.float())


def _plain_pad_groups(valid: torch.Tensor, q_len: int):
    """Pad groups of a 2-D key mask that the decode op can express for plain K/V, else None."""
    pads, left_padded = _padding_pattern(valid)
    if not bool(left_padded):
        return None
    values = pads.tolist()
    if (q_len > 1 and any(values)) or max(values) >= valid.shape[-1]:  # per-query-row edges; a row with no key
        return None
    return _group_rows(values, valid.device)


def padded_plain_decode(query, key, value, attention_mask, *, scaling=None, sliding_window=None, softcap=None,
                        s_aux=None):
    """A small query against plain cached K/V (B, Hkv, S, D) with a 2-D key mask -> (B, Lq, Hq, D), or None.

    Left padding (batched generate) and unfilled slots after the mask's length (a StaticCache's buffer)
    become each row's visible key range on the decode op: cache_seqlens = the mask's length and a left
    window ending at the row's first real key, rows of equal padding in one call through
    cache_batch_idx. No copy of K/V (transformers' flash path would unpad, i.e. gather, them per layer).
    The mask is analysed once per step (mask_memo). None for any other pattern: the caller takes its
    general path.
    """
    if attention_mask.dim() != 2 or torch.compiler.is_compiling():
        return None
    q_len, total = query.shape[2], key.shape[2]
    valid = attention_mask[:, -total:]  # a sliding layer's buffer holds the last `total` keys
    length = valid.shape[-1]  # keys past it: a static cache's unfilled slots
    if length < q_len:
        return None
    groups = once_per_mask(attention_mask, ("plain pads", total, q_len), lambda: _plain_pad_groups(valid.bool(), q_len))
    if groups is None:
        return None
    window_left = sliding_window - 1 if sliding_window is not None and sliding_window < length + 1 else -1
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    def attend(q_rows, rows, pad):
        left = _left(window_left, length - 1 - pad if pad else None)  # pads only with one query token
        return kvcache.attend_kvcache(
            q_rows, k, v, cache_seqlens=length, cache_batch_idx=None if rows is None else rows[0],
            host_batch_idx=None if rows is None else rows[1], softmax_scale=scaling, causal=True,
            window_size=(left, 0 if left >= 0 else -1), softcap=softcap or 0.0,
            sinks=None if s_aux is None else s_aux.float())

    return _over_pad_groups(groups, q, lambda q_rows, rows, pad: (attend(q_rows, rows, pad),))[0]
