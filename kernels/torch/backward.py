"""Backward of the torch backend, FlashAttention-2 style: recompute each score block from the
saved LSE instead of differentiating through the forward's chunks."""

from __future__ import annotations

import math

import torch

from ..launch import new_output
from .forward import accumulation_dtype
from .scores import (
    ScoreSpec,
    add_mask_grad,
    block_scores,
    dropout_keep,
    grouped_queries,
    heads_last,
    ungroup,
)
from .tiles import key_blocks, query_tile, query_tiles


def backward_dense(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    spec: ScoreSpec,
    sinks: torch.Tensor | None,
    want_mask_grad: bool,
):
    """Returns (dq, dk, dv, dsinks or None, dmask or None) for one dense (B, S, H, D) problem."""
    batch, lq, heads_q, _ = q.shape
    acc_dtype = accumulation_dtype(q.dtype)
    # delta_i = rowsum(dO_i * O_i) - dLSE_i: the softmax Jacobian's correction term per row.
    delta = (grad_out.to(acc_dtype) * out.to(acc_dtype)).sum(-1).transpose(1, 2)  # (B, Hq, Lq)
    if grad_lse is not None:
        delta = delta - grad_lse.to(acc_dtype)
    dq = new_output(q.shape, q.dtype, q.device)
    dk = torch.zeros(k.shape, dtype=acc_dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc_dtype, device=q.device)
    dmask = None
    if want_mask_grad:
        dmask = torch.zeros(spec.mask_shape, dtype=acc_dtype, device=q.device)
    rows_per_tile = query_tile(batch * heads_q, lq)
    for i0, i1 in query_tiles(lq, rows_per_tile):
        dq[:, i0:i1] = _query_tile(
            grad_out[:, i0:i1], q[:, i0:i1], k, v, lse[:, :, i0:i1], delta[:, :, i0:i1],
            spec, i0, acc_dtype, dk, dv, dmask,
        )
    dsinks = None
    if sinks is not None:
        sink = sinks.to(acc_dtype)[None, :, None]
        sink_prob = torch.exp(sink - lse.to(acc_dtype))
        dsinks = -(sink_prob * delta).sum(dim=(0, 2)).to(sinks.dtype)
    return dq, dk.to(k.dtype), dv.to(v.dtype), dsinks, dmask


def _query_tile(grad_out, q_tile, k, v, lse, delta, spec: ScoreSpec, i0, acc_dtype, dk, dv, dmask):
    batch, rows = q_tile.shape[0], q_tile.shape[1]
    q5 = grouped_queries(q_tile, spec.heads_kv, acc_dtype)
    do5 = grouped_queries(grad_out, spec.heads_kv, acc_dtype)
    lse5 = _lse_or_inf(lse.to(acc_dtype)).reshape(batch, spec.heads_kv, spec.group, rows, 1)
    delta5 = delta.reshape(batch, spec.heads_kv, spec.group, rows, 1)
    dq5 = torch.zeros_like(q5)
    for block in key_blocks(spec.band, i0, i0 + rows):
        k_tile = heads_last(k[:, block.j0 : block.j1], acc_dtype)
        v_tile = heads_last(v[:, block.j0 : block.j1], acc_dtype)
        scores, capped = block_scores(spec, q5, k_tile, block)
        probs = scores.sub_(lse5).exp_()  # scores are this block's own: reuse them
        dprobs = (do5 @ v_tile.transpose(-1, -2)).reshape(probs.shape)
        dropped = probs
        if spec.dropout_p > 0:
            keep = dropout_keep(spec, batch, block, q5.device) / (1.0 - spec.dropout_p)
            dropped = probs * keep
            dprobs = dprobs * keep
        flat = dropped.reshape(batch, spec.heads_kv, -1, dropped.shape[-1])
        dv[:, block.j0 : block.j1] += (flat.transpose(-1, -2) @ do5).transpose(1, 2)
        dscores = probs * (dprobs - delta5)
        if dmask is not None:
            add_mask_grad(spec, dmask, dscores, block)
        if capped is not None:
            dscores = dscores * (1 - capped * capped)
        dscores = dscores.reshape(flat.shape) * spec.scale
        dq5 += dscores @ k_tile
        dk[:, block.j0 : block.j1] += (dscores.transpose(-1, -2) @ q5).transpose(1, 2)
    return ungroup(dq5, rows)


def _lse_or_inf(lse: torch.Tensor) -> torch.Tensor:
    """Rows that saw nothing have LSE -inf; +inf there makes exp(s - lse) = 0 instead of NaN."""
    return torch.where(lse == -math.inf, math.inf, lse)
