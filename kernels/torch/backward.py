"""Backward of the torch backend, FlashAttention-2 style: recompute each score block from the
saved LSE instead of differentiating through the forward's chunks.

backward(call, grads) serves a dense call in one pass and a packed (varlen) one sequence at a time
(sequences.py); backward_dense is the algorithm on one dense (B, S, H, D) problem. With
Options.bf16_backward its five matmuls take bfloat16 operands and sum in float32 (products.py)."""

from __future__ import annotations

import math

import torch

from ..contract import AttentionCall, Gradients
from ..launch import empty_grads, new_output
from .forward import accumulation_dtype
from .products import products_for
from .scores import (
    ScoreSpec,
    add_mask_grad,
    block_scores,
    dropout_keep,
    grouped_queries,
    heads_last,
    ungroup,
)
from .sequences import call_spec, segments, sequence_slopes
from .tiles import key_blocks, query_tile, query_tiles


def backward(call: AttentionCall, grads: Gradients):
    """(dq, dk, dv, dsinks or None, dmask or None) (kernels/contract.py)."""
    q, k, v, sinks, grad_lse = call.q, call.k, call.v, call.sinks, grads.grad_lse
    bf16 = call.options.bf16_backward
    if not call.varlen:
        if call.empty:
            return empty_grads(q, k, v, sinks, grad_lse, call.attn_mask.shape if grads.want_mask_grad else None)
        spec = call_spec(call, q, k, call.attn_mask, call.alibi_slopes)
        return backward_dense(grads.grad_out, grad_lse, q, k, v, grads.out, grads.lse, spec, sinks,
                              grads.want_mask_grad, bf16)
    dq, dk, dv, dsinks, _ = empty_grads(q, k, v, sinks, None)
    for b, rows, keys in segments(call.cu_seqlens_q, call.cu_seqlens_k, q.shape[0], k.shape[0]):
        if rows.stop == rows.start:
            continue
        if keys.stop == keys.start:  # rows that see only their sink (empty_grads says why)
            if dsinks is not None and grad_lse is not None:
                dsinks += grad_lse[:, rows].sum(dim=-1).to(dsinks.dtype)
            continue
        qb, kb, vb = q[None, rows], k[None, keys], v[None, keys]
        spec = call_spec(call, qb, kb, None, sequence_slopes(call.alibi_slopes, b), batch_offset=b)
        seq_grad_lse = None if grad_lse is None else grad_lse[None, :, rows]
        result = backward_dense(grads.grad_out[None, rows], seq_grad_lse, qb, kb, vb, grads.out[None, rows],
                                grads.lse[None, :, rows], spec, sinks, False, bf16)
        dq[rows], dk[keys], dv[keys] = result[0][0], result[1][0], result[2][0]
        if dsinks is not None:
            dsinks += result[3]
    return dq, dk, dv, dsinks, None


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
    bf16_backward: bool = False,
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
    products = products_for(bf16_backward, q.device)
    rows_per_tile = query_tile(batch * heads_q, lq)
    for i0, i1 in query_tiles(lq, rows_per_tile):
        dq[:, i0:i1] = _query_tile(
            grad_out[:, i0:i1], q[:, i0:i1], k, v, lse[:, :, i0:i1], delta[:, :, i0:i1],
            spec, i0, acc_dtype, dk, dv, dmask, products,
        )
    dsinks = None
    if sinks is not None:
        sink = sinks.to(acc_dtype)[None, :, None]
        sink_prob = torch.exp(sink - lse.to(acc_dtype))
        dsinks = -(sink_prob * delta).sum(dim=(0, 2)).to(sinks.dtype)
    return dq, dk.to(k.dtype), dv.to(v.dtype), dsinks, dmask


def _query_tile(grad_out, q_tile, k, v, lse, delta, spec: ScoreSpec, i0, acc_dtype, dk, dv, dmask, products):
    batch, rows = q_tile.shape[0], q_tile.shape[1]
    mm, operand = products.mm, products.operand
    q5 = operand(grouped_queries(q_tile, spec.heads_kv, acc_dtype))
    do5 = operand(grouped_queries(grad_out, spec.heads_kv, acc_dtype))
    lse5 = _lse_or_inf(lse.to(acc_dtype)).reshape(batch, spec.heads_kv, spec.group, rows, 1)
    delta5 = delta.reshape(batch, spec.heads_kv, spec.group, rows, 1)
    dq5 = torch.zeros(q5.shape, dtype=acc_dtype, device=q5.device)
    for block in key_blocks(spec.band, i0, i0 + rows):
        k_tile = operand(heads_last(k[:, block.j0 : block.j1], acc_dtype))
        v_tile = operand(heads_last(v[:, block.j0 : block.j1], acc_dtype))
        scores, capped = block_scores(spec, q5, k_tile, block, products)
        probs = scores.sub_(lse5).exp_()  # scores are this block's own: reuse them
        dprobs = mm(do5, v_tile.transpose(-1, -2)).reshape(probs.shape)
        dropped = probs
        if spec.dropout_p > 0:
            keep = dropout_keep(spec, batch, block, q5.device) / (1.0 - spec.dropout_p)
            dropped = probs * keep
            dprobs = dprobs * keep
        flat = dropped.reshape(batch, spec.heads_kv, -1, dropped.shape[-1])
        dv[:, block.j0 : block.j1] += mm(operand(flat).transpose(-1, -2), do5).transpose(1, 2)
        dscores = probs * (dprobs - delta5)
        if dmask is not None:
            add_mask_grad(spec, dmask, dscores, block)
        if capped is not None:
            dscores = dscores * (1 - capped * capped)
        dscores = operand(dscores.reshape(flat.shape) * spec.scale)
        dq5 += mm(dscores, k_tile)
        dk[:, block.j0 : block.j1] += mm(dscores.transpose(-1, -2), q5).transpose(1, 2)
    return ungroup(dq5, rows)


def _lse_or_inf(lse: torch.Tensor) -> torch.Tensor:
    """Rows that saw nothing have LSE -inf; +inf there makes exp(s - lse) = 0 instead of NaN."""
    return torch.where(lse == -math.inf, math.inf, lse)
