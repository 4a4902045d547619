"""The `torch` backend: chunked online softmax in PyTorch ops, every feature, any device, O(N) memory.

Packed (varlen) batches are served one sequence at a time with Python offsets: this backend is the
always-correct fallback, not the fast path, and reading cu_seqlens on the host is its price (with a
check of their values: the API layer trusts device offsets, as FlashAttention-2 does).
"""

from __future__ import annotations

import torch

from mfa_hf.ops import define_attention_ops, define_decode_op, empty_grads, empty_result
from mfa_hf.problem import AttentionProblem, check_offsets

from .backward import backward_dense
from .decode import run_decode
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


def _spec(q, k, attn_mask, alibi_slopes, dropout_seed, scale, causal, window_left, window_right,
          softcap, dropout_p, batch_offset=0):
    band = make_band(q.shape[1], k.shape[1], causal, window_left, window_right)
    return make_spec(q, k, scale, softcap, band, alibi_slopes, attn_mask, dropout_p, dropout_seed,
                     batch_offset)


def _sequence_slopes(alibi_slopes, b):
    if alibi_slopes is None or alibi_slopes.dim() == 1:
        return alibi_slopes
    return alibi_slopes[b]


def forward(q, k, v, attn_mask, alibi_slopes, sinks, cu_seqlens_q, cu_seqlens_k, dropout_seed,
            max_seqlen_q, max_seqlen_k, scale, causal, window_left, window_right, softcap, dropout_p):
    options = (scale, causal, window_left, window_right, softcap, dropout_p)
    if cu_seqlens_q is None:
        if q.shape[0] == 0 or q.shape[1] == 0 or k.shape[1] == 0:
            return empty_result(q, v, sinks)
        spec = _spec(q, k, attn_mask, alibi_slopes, dropout_seed, *options)
        return forward_dense(q, k, v, spec, sinks)
    out, lse = empty_result(q, v, sinks)
    for b, rows, keys in _segments(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0]):
        if rows.stop == rows.start or keys.stop == keys.start:
            continue
        qb, kb, vb = q[None, rows], k[None, keys], v[None, keys]
        spec = _spec(qb, kb, None, _sequence_slopes(alibi_slopes, b), dropout_seed, *options, batch_offset=b)
        seq_out, seq_lse = forward_dense(qb, kb, vb, spec, sinks)
        out[rows] = seq_out[0]
        lse[:, rows] = seq_lse[0]
    return out, lse


def backward(grad_out, grad_lse, q, k, v, out, lse, attn_mask, alibi_slopes, sinks, cu_seqlens_q,
             cu_seqlens_k, dropout_seed, max_seqlen_q, max_seqlen_k, scale, causal, window_left,
             window_right, softcap, dropout_p, want_mask_grad):
    options = (scale, causal, window_left, window_right, softcap, dropout_p)
    if cu_seqlens_q is None:
        if q.shape[0] == 0 or q.shape[1] == 0 or k.shape[1] == 0:
            return empty_grads(q, k, v, sinks, grad_lse, attn_mask.shape if want_mask_grad else None)
        spec = _spec(q, k, attn_mask, alibi_slopes, dropout_seed, *options)
        return backward_dense(grad_out, grad_lse, q, k, v, out, lse, spec, sinks, want_mask_grad)
    dq, dk, dv, dsinks, _ = empty_grads(q, k, v, sinks, None)
    for b, rows, keys in _segments(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0]):
        if rows.stop == rows.start:
            continue
        if keys.stop == keys.start:  # rows that see only their sink (empty_grads says why)
            if dsinks is not None and grad_lse is not None:
                dsinks += grad_lse[:, rows].sum(dim=-1).to(dsinks.dtype)
            continue
        qb, kb, vb = q[None, rows], k[None, keys], v[None, keys]
        spec = _spec(qb, kb, None, _sequence_slopes(alibi_slopes, b), dropout_seed, *options, batch_offset=b)
        seq_grad_lse = None if grad_lse is None else grad_lse[None, :, rows]
        grads = backward_dense(grad_out[None, rows], seq_grad_lse, qb, kb, vb, out[None, rows],
                               lse[None, :, rows], spec, sinks, False)
        dq[rows], dk[keys], dv[keys] = grads[0][0], grads[1][0], grads[2][0]
        if dsinks is not None:
            dsinks += grads[3]
    return dq, dk, dv, dsinks, None


OPS = define_attention_ops(NAME, forward, backward)
DECODE = define_decode_op(NAME, run_decode)  # quantized/plain KV-cache attention (decode.py)
