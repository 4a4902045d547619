"""Query-chunked attention for very long sequences (flash_attention_chunked).

A chunk of query rows [i0, i1) is handed only the keys [k0, k1) it can see. The backends align
causal/window bottom-right within each call, so every chunk's (left, right) window is re-expressed
relative to the sub-call's own diagonal; the shift is what keeps the semantics of the whole call.
"""

from __future__ import annotations

import torch

from .api import flash_attn_func
from .problem import check_mask


def chunk_plan(lq: int, lk: int, i0: int, i1: int, window: tuple[int, int], causal: bool):
    """Keys (k0, k1) and the sub-call's window for query rows [i0, i1) of an (Lq, Lk) problem."""
    left, right = window
    if causal:
        right = 0
    diagonal = lk - lq
    k0 = 0 if left < 0 else max(0, i0 + diagonal - left)
    k1 = lk if right < 0 else min(lk, i1 + diagonal + right)
    k0 = min(k0, k1)
    # The sub-call puts row i0 on key (k1 - k0) - (i1 - i0) of its slice; the truth is i0 + diagonal - k0.
    shift = (i0 + diagonal - k0) - ((k1 - k0) - (i1 - i0))
    sub_left = -1 if left < 0 else left - shift
    sub_right = -1 if right < 0 else right + shift
    return k0, k1, (sub_left, sub_right), shift


def _slice_mask(attn_mask, i0, i1, k0, k1):
    """The chunk's rows [i0, i1) and keys [k0, k1) of a mask broadcastable to (B, H, Lq, Lk): a dim of size 1, or
    one the mask does not have (a (Lk,) or 0-d mask), broadcasts and is kept whole."""
    if attn_mask is None:
        return None
    if attn_mask.dim() == 0:
        return attn_mask
    cols = slice(k0, k1) if attn_mask.shape[-1] != 1 else slice(None)
    if attn_mask.dim() == 1:
        return attn_mask[cols]
    rows = slice(i0, i1) if attn_mask.shape[-2] != 1 else slice(None)
    return attn_mask[..., rows, cols]


def chunked_attention(q, k, v, chunk_size, causal, attn_mask, window, scale, softcap, sinks,
                      alibi_slopes, return_lse):
    lq, lk = q.shape[2], k.shape[2]
    check_mask(attn_mask, q.shape[0], q.shape[1], lq, lk, q.device)  # whole, before it is sliced per chunk
    whole = dict(softmax_scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                 return_lse=True)
    plans = [(i0, min(lq, i0 + chunk_size)) for i0 in range(0, lq, chunk_size)] or [(0, 0)]  # no rows: one call
    plans = [(i0, i1) + chunk_plan(lq, lk, i0, i1, window, causal) for i0, i1 in plans]
    if alibi_slopes is not None and any(plan[-1] != 0 for plan in plans):
        # ALiBi distances are measured from the sub-call's diagonal, so a shifted chunk would
        # change them: serve the call whole (still O(N) memory) rather than approximately.
        plans = [(0, lq) + chunk_plan(lq, lk, 0, lq, window, causal)]
    qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    outs, lses = [], []
    for i0, i1, k0, k1, sub_window, _ in plans:
        out, lse = flash_attn_func(
            qs[:, i0:i1], ks[:, k0:k1], vs[:, k0:k1], causal=False, window_size=sub_window,
            attn_mask=_slice_mask(attn_mask, i0, i1, k0, k1), **whole,
        )
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=1).transpose(1, 2)
    return (out, torch.cat(lses, dim=-1)) if return_lse else out
