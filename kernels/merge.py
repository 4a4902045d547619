"""Attention over a cache held in two parts: a (quantized) prefix and a full-precision residual.

KIVI-style caches (MFAQuantizedCache with residual_length > 0) keep the oldest tokens as codes and the
newest ones in full precision. Row b's keys are prefix[0 : seqlens_k[b]] followed by the r residual
tokens; the queries align bottom-right on all of them (query i of Lq sits on key L_b - Lq + i, with
L_b = seqlens_k[b] + r) and the window counts in those keys. Each part is attended by the backend's
own decode, then the two partial results are merged here by their log-sum-exps, with the sinks
applied once, after the merge. Backend-neutral torch code: a backend may fuse it later.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from .contract import CacheSide, DecodeCall, Options
from .launch import lse_dtype


def merge_partials(parts: list[tuple[Tensor, Tensor]], sinks: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Combine attention results over disjoint key sets by their log-sum-exps; out (B, Lq, Hq, Dv),
    lse (B, Hq, Lq). Sinks (Hq,) join the softmax denominator once: out is scaled by
    exp(lse) / (exp(lse) + exp(sink)) and lse becomes logaddexp(lse, sink). A row that sees no key in any
    part keeps out 0 and lse -inf (or its sink)."""
    out, lse = parts[0]
    acc = torch.float64 if lse.dtype == torch.float64 or out.dtype == torch.float64 else torch.float32
    if len(parts) > 1:
        lses = torch.stack([part_lse.to(acc) for _, part_lse in parts])
        lse = torch.logsumexp(lses, dim=0)
        weights = torch.exp(lses - lse).nan_to_num(0.0)  # -inf - -inf: a part and the whole both empty
        total = sum(part_out.to(acc) * w.transpose(1, 2)[..., None] for (part_out, _), w in zip(parts, weights))
        out = total.to(parts[0][0].dtype)
    if sinks is None:
        return out, lse
    sink = sinks.to(acc)[None, :, None]
    keep = torch.sigmoid(lse.to(acc) - sink)  # exp(lse) / (exp(lse) + exp(sink)); 0 for an empty row
    return (out.to(acc) * keep.transpose(1, 2)[..., None]).to(out.dtype), torch.logaddexp(lse.to(acc), sink)


def shifted_window(options: Options, residual: int, lq: int) -> Optional[tuple[Options, int]]:
    """The prefix part's window and how many leading query rows see a prefix key at all: the prefix's keys end
    `residual` keys before the queries' own. Row i of lq stands `residual` keys past where a prefix call aligns it,
    so the left span shrinks and the right span grows by that shift. Where the left span would go below 0, only
    the first lq - (residual - left) rows reach the prefix: presented alone (bottom-right aligned), they stand
    `left` keys past their alignment, so their left span is 0. None when no query can see a prefix key."""
    left, right = options.window_left, options.window_right
    rows, shift = lq, residual
    if 0 <= left < residual:
        rows, shift = lq - (residual - left), left
        if rows <= 0:
            return None
    if left >= 0:
        left -= shift
    if right >= 0:
        right += shift
    return dataclasses.replace(options, window_left=left, window_right=right), rows


def decode_with_residual(decode: Callable[[DecodeCall], tuple[Tensor, Tensor]],
                         call: DecodeCall) -> tuple[Tensor, Tensor]:
    """(out, lse) of a DecodeCall with a residual (contract.DecodeCall), from `decode` calls without one."""
    k_res, v_res, residual_lengths = call.residual_keys, call.residual_values, call.residual_lengths
    call = dataclasses.replace(call, residual_keys=None, residual_values=None, residual_lengths=None)
    r = k_res.shape[1]
    lq = call.q.shape[1]
    parts = []
    if call.keys.codes.shape[1]:
        prefix = shifted_window(call.options, r, lq)
        if prefix is not None:
            options, rows = prefix
            part = decode(dataclasses.replace(call, q=call.q[:, :rows], options=options, sinks=None))
            parts.append(part if rows == lq else _padded_rows(part, lq))
    if r:
        sides = (CacheSide(k_res, None, "none", k_res.shape[-1]), CacheSide(v_res, None, "none", v_res.shape[-1]))
        parts.append(decode(dataclasses.replace(call, keys=sides[0], values=sides[1], seqlens_k=residual_lengths,
                                                sinks=None)))
    if not parts:  # no key visible anywhere: out 0, lse -inf (the sinks' logits after the merge)
        batch, _, heads_q, _ = call.q.shape
        out = call.q.new_zeros((batch, lq, heads_q, v_res.shape[-1]))
        parts.append((out, torch.full((batch, heads_q, lq), -torch.inf, dtype=lse_dtype(call.q.dtype), device=call.q.device)))
    return merge_partials(parts, call.sinks)


def _padded_rows(part: tuple[Tensor, Tensor], lq: int) -> tuple[Tensor, Tensor]:
    """A part over the first query rows, as one over all lq: the other rows saw no key (out 0, lse -inf)."""
    out, lse = part
    rows = out.shape[1]
    out = torch.cat([out, out.new_zeros((out.shape[0], lq - rows, *out.shape[2:]))], dim=1)
    lse = torch.cat([lse, lse.new_full((*lse.shape[:2], lq - rows), -torch.inf)], dim=2)
    return out, lse
