"""The `torch` backend: chunked online softmax in PyTorch ops, every feature, any device, O(N) memory.

Packed (varlen) batches are served one sequence at a time with Python offsets: this backend is the
always-correct fallback, not the fast path, and reading cu_seqlens on the host is its price (with a
check of their values: the API layer trusts device offsets, as FlashAttention-2 does).
"""

from __future__ import annotations

import torch

from mfa_hf.problem import AttentionProblem, check_offsets

from ..contract import AttentionCall, BackendDefinition, Gradients
from ..launch import empty_grads, empty_result
from .backward import backward_dense
from .decode import decode
from .forward import forward_dense
from .scores import make_spec
from .tiles import make_band

NAME = "torch"


def supports(problem: AttentionProblem) -> tuple[bool, str]:
    return True, "the torch backend serves every feature on every device"


def _segments(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int):
    """(b, query rows, key rows) per sequence. The offsets are read on the host here, in one read (a sync
    off the CPU: this backend's price), and checked: the API trusts device offsets (problem.values_checked)."""
    count = cu_seqlens_q.numel()
    starts = torch.cat([cu_seqlens_q, cu_seqlens_k.to(cu_seqlens_q.dtype)]).tolist()
    starts_q, starts_k = starts[:count], starts[count:]
    check_offsets(starts_q, "cu_seqlens_q", total_q)
    check_offsets(starts_k, "cu_seqlens_k", total_k)
    for b in range(len(starts_q) - 1):
        yield b, slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])


def _spec(call: AttentionCall, q, k, attn_mask, alibi_slopes, batch_offset=0):
    o = call.options
    band = make_band(q.shape[1], k.shape[1], o.window_left, o.window_right)
    return make_spec(q, k, o.scale, o.softcap, band, alibi_slopes, attn_mask, o.dropout_p, call.dropout_seed,
                     batch_offset)


def _sequence_slopes(alibi_slopes, b):
    if alibi_slopes is None or alibi_slopes.dim() == 1:
        return alibi_slopes
    return alibi_slopes[b]


def forward(call: AttentionCall):
    q, k, v, sinks = call.q, call.k, call.v, call.sinks
    if not call.varlen:
        if call.empty:
            return empty_result(q, v, sinks)
        return forward_dense(q, k, v, _spec(call, q, k, call.attn_mask, call.alibi_slopes), sinks)
    out, lse = empty_result(q, v, sinks)
    for b, rows, keys in _segments(call.cu_seqlens_q, call.cu_seqlens_k, q.shape[0], k.shape[0]):
        if rows.stop == rows.start or keys.stop == keys.start:
            continue
        qb, kb, vb = q[None, rows], k[None, keys], v[None, keys]
        spec = _spec(call, qb, kb, None, _sequence_slopes(call.alibi_slopes, b), batch_offset=b)
        seq_out, seq_lse = forward_dense(qb, kb, vb, spec, sinks)
        out[rows] = seq_out[0]
        lse[:, rows] = seq_lse[0]
    return out, lse


def backward(call: AttentionCall, grads: Gradients):
    q, k, v, sinks, grad_lse = call.q, call.k, call.v, call.sinks, grads.grad_lse
    if not call.varlen:
        if call.empty:
            return empty_grads(q, k, v, sinks, grad_lse, call.attn_mask.shape if grads.want_mask_grad else None)
        spec = _spec(call, q, k, call.attn_mask, call.alibi_slopes)
        return backward_dense(grads.grad_out, grad_lse, q, k, v, grads.out, grads.lse, spec, sinks,
                              grads.want_mask_grad)
    dq, dk, dv, dsinks, _ = empty_grads(q, k, v, sinks, None)
    for b, rows, keys in _segments(call.cu_seqlens_q, call.cu_seqlens_k, q.shape[0], k.shape[0]):
        if rows.stop == rows.start:
            continue
        if keys.stop == keys.start:  # rows that see only their sink (empty_grads says why)
            if dsinks is not None and grad_lse is not None:
                dsinks += grad_lse[:, rows].sum(dim=-1).to(dsinks.dtype)
            continue
        qb, kb, vb = q[None, rows], k[None, keys], v[None, keys]
        spec = _spec(call, qb, kb, None, _sequence_slopes(call.alibi_slopes, b), batch_offset=b)
        seq_grad_lse = None if grad_lse is None else grad_lse[None, :, rows]
        result = backward_dense(grads.grad_out[None, rows], seq_grad_lse, qb, kb, vb, grads.out[None, rows],
                                grads.lse[None, :, rows], spec, sinks, False)
        dq[rows], dk[keys], dv[keys] = result[0][0], result[1][0], result[2][0]
        if dsinks is not None:
            dsinks += result[3]
    return dq, dk, dv, dsinks, None


BACKEND = BackendDefinition(NAME, supports, forward, backward, decode)
