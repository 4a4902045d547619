"""Query-chunked attention for very long sequences (flash_attention_chunked).

A chunk of query rows [i0, i1) is handed only the keys [k0, k1) it can see. The backends align
causal/window bottom-right within each call, so every chunk's (left, right) window is re-expressed
relative to the sub-call's own diagonal; the shift is what keeps the semantics of the whole call.
"""

from __future__ import annotations

import torch

from .api import flash_attn_func
from .ops import forward_ad_active, under_transforms
from .problem import check_mask

HALF_DTYPES = (torch.float16, torch.bfloat16)


class _Float32Anchor(torch.autograd.Function):
    """A float32 stand-in of x's shape (one element, broadcast: no memory) whose gradient is the sum of the chunks'
    gradients, in float32; x gets it once, in its own dtype."""

    @staticmethod
    def forward(ctx, x):
        ctx.dtype = x.dtype
        return x.new_zeros((), dtype=torch.float32).expand(x.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype)


class _GradViaAnchor(torch.autograd.Function):
    """x as it is (the kernel reads the input's own values); its gradient goes to the anchor's slice in float32."""

    @staticmethod
    def forward(ctx, x, anchor):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return None, grad.float()


def _chunk_slices(t, slicer, summed: bool):
    """index -> slicer(t, *index), one chunk's part of t. When the chunks' gradients of t are summed (several chunks
    read it) in float16/bfloat16, they are summed in float32 instead (DESIGN.md: accumulation in float32): autograd
    summed them in t's dtype, so dK/dV of many chunks left the tolerance (fp16, 256 chunks: 5.2e-3 against 2.8e-3)."""
    if (not summed or not isinstance(t, torch.Tensor) or t.dtype not in HALF_DTYPES or not t.requires_grad
            or not torch.is_grad_enabled() or torch.compiler.is_compiling() or forward_ad_active()
            or under_transforms()):
        return lambda *index: slicer(t, *index)
    anchor = _Float32Anchor.apply(t)
    return lambda *index: _GradViaAnchor.apply(slicer(t, *index), slicer(anchor, *index))


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


def _keys(t, k0, k1):
    return t[:, k0:k1]


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
    whole = dict(softmax_scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True)
    plans = [(i0, min(lq, i0 + chunk_size)) for i0 in range(0, lq, chunk_size)] or [(0, 0)]  # no rows: one call
    plans = [(i0, i1) + chunk_plan(lq, lk, i0, i1, window, causal) for i0, i1 in plans]
    if alibi_slopes is not None and any(plan[-1] != 0 for plan in plans):
        # ALiBi distances are measured from the sub-call's diagonal, so a shifted chunk would
        # change them: serve the call whole (still O(N) memory) rather than approximately.
        plans = [(0, lq) + chunk_plan(lq, lk, 0, lq, window, causal)]
    qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    summed = len(plans) > 1  # k, v, the mask and sinks are read by every chunk: their gradients are sums
    k_of, v_of = _chunk_slices(ks, _keys, summed), _chunk_slices(vs, _keys, summed)
    mask_of = _chunk_slices(attn_mask, _slice_mask, summed)
    sinks_of = _chunk_slices(sinks, lambda t: t, summed)  # a node of its own per chunk: the sum is the anchor's
    outs, lses = [], []
    for i0, i1, k0, k1, sub_window, _ in plans:
        out, lse = flash_attn_func(qs[:, i0:i1], k_of(k0, k1), v_of(k0, k1), causal=False, window_size=sub_window,
                                   attn_mask=mask_of(i0, i1, k0, k1), sinks=sinks_of(), **whole)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=1).transpose(1, 2)
    return (out, torch.cat(lses, dim=-1)) if return_lse else out
