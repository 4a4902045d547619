"""What the torch backend's forward and backward share around the dense algorithm: the ScoreSpec of a
call (or of one of its packed sequences), and the walk over packed (varlen) sequences.

Packed batches are served one sequence at a time with Python offsets: this backend is the
always-correct fallback, not the fast path, and reading cu_seqlens on the host is its price (with a
check of their values: the API layer trusts device offsets, as FlashAttention-2 does).
"""

from __future__ import annotations

import torch

from mfa_hf.problem import check_offsets

from ..contract import AttentionCall
from .scores import ScoreSpec, make_spec
from .tiles import make_band


def segments(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int):
    """(b, query rows, key rows) per sequence. The offsets are read on the host here, in one read (a sync
    off the CPU: this backend's price), and checked: the API trusts device offsets (problem.values_checked)."""
    count = cu_seqlens_q.numel()
    starts = torch.cat([cu_seqlens_q, cu_seqlens_k.to(cu_seqlens_q.dtype)]).tolist()
    starts_q, starts_k = starts[:count], starts[count:]
    check_offsets(starts_q, "cu_seqlens_q", total_q)
    check_offsets(starts_k, "cu_seqlens_k", total_k)
    for b in range(len(starts_q) - 1):
        yield b, slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])


def call_spec(call: AttentionCall, q, k, attn_mask, alibi_slopes, batch_offset=0) -> ScoreSpec:
    """The ScoreSpec of `call` over dense q (B, Lq, Hq, D) and k: the whole call, or one packed sequence."""
    o = call.options
    band = make_band(q.shape[1], k.shape[1], o.window_left, o.window_right)
    return make_spec(q, k, o.scale, o.softcap, band, alibi_slopes, attn_mask, o.dropout_p, call.dropout_seed,
                     batch_offset)


def sequence_slopes(alibi_slopes, b):
    """Sequence b's ALiBi slopes: (Hq,) slopes are shared, (B, Hq) slopes have a row per sequence."""
    if alibi_slopes is None or alibi_slopes.dim() == 1:
        return alibi_slopes
    return alibi_slopes[b]
