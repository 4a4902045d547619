"""Forward of the torch backend: online softmax over key blocks (FlashAttention-2 order).

forward(call) serves a dense call in one pass and a packed (varlen) one sequence at a time
(sequences.py); forward_dense is the algorithm on one dense (B, S, H, D) problem."""

from __future__ import annotations

import math

import torch

from ..contract import AttentionCall
from ..launch import empty_result, lse_dtype, new_output
from .scores import ScoreSpec, block_scores, dropout_keep, grouped_queries, heads_last, ungroup
from .sequences import call_spec, segments, sequence_slopes
from .tiles import key_blocks, query_tile, query_tiles


accumulation_dtype = lse_dtype  # float32, or float64 for float64 inputs


def forward(call: AttentionCall):
    """(out, lse) (kernels/contract.py)."""
    q, k, v, sinks = call.q, call.k, call.v, call.sinks
    if not call.varlen:
        if call.empty:
            return empty_result(q, v, sinks)
        return forward_dense(q, k, v, call_spec(call, q, k, call.attn_mask, call.alibi_slopes), sinks)
    out, lse = empty_result(q, v, sinks)
    for b, rows, keys in segments(call.cu_seqlens_q, call.cu_seqlens_k, q.shape[0], k.shape[0]):
        if rows.stop == rows.start or keys.stop == keys.start:
            continue
        qb, kb, vb = q[None, rows], k[None, keys], v[None, keys]
        spec = call_spec(call, qb, kb, None, sequence_slopes(call.alibi_slopes, b), batch_offset=b)
        seq_out, seq_lse = forward_dense(qb, kb, vb, spec, sinks)
        out[rows] = seq_out[0]
        lse[:, rows] = seq_lse[0]
    return out, lse


def forward_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ScoreSpec, sinks: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Lq, Hq, D), k (B, Lk, Hkv, D), v (B, Lk, Hkv, Dv) -> out (B, Lq, Hq, Dv), lse (B, Hq, Lq)."""
    batch, lq, heads_q, _ = q.shape
    acc_dtype = accumulation_dtype(q.dtype)
    out = new_output((batch, lq, heads_q, v.shape[-1]), q.dtype, q.device)
    lse = new_output((batch, heads_q, lq), acc_dtype, q.device)
    rows_per_tile = query_tile(batch * heads_q, lq)
    for i0, i1 in query_tiles(lq, rows_per_tile):
        tile_out, tile_lse = _query_tile(q[:, i0:i1], k, v, spec, sinks, i0, acc_dtype)
        out[:, i0:i1] = tile_out
        lse[:, :, i0:i1] = tile_lse
    return out, lse


def _query_tile(q_tile, k, v, spec: ScoreSpec, sinks, i0: int, acc_dtype):
    batch, rows = q_tile.shape[0], q_tile.shape[1]
    q5 = grouped_queries(q_tile, spec.heads_kv, acc_dtype)
    state_shape = (batch, spec.heads_kv, spec.group, rows)
    row_max = q5.new_full(state_shape, -math.inf)
    row_sum = q5.new_zeros(state_shape)
    acc = q5.new_zeros(batch, spec.heads_kv, spec.group * rows, v.shape[-1])
    for block in key_blocks(spec.band, i0, i0 + rows):
        k_tile = heads_last(k[:, block.j0 : block.j1], acc_dtype)
        v_tile = heads_last(v[:, block.j0 : block.j1], acc_dtype)
        scores, _ = block_scores(spec, q5, k_tile, block)
        new_max = torch.maximum(row_max, scores.amax(dim=-1))
        safe_max = _finite_or_zero(new_max)
        weights = scores.sub_(safe_max[..., None]).exp_()  # scores are this block's own: reuse them
        rescale = torch.exp(row_max - safe_max)
        row_sum = row_sum * rescale + weights.sum(dim=-1)
        if spec.dropout_p > 0:
            keep = dropout_keep(spec, batch, block, q5.device)
            weights = weights * keep / (1.0 - spec.dropout_p)
        acc = acc * rescale.reshape(batch, spec.heads_kv, -1, 1)
        acc = acc + weights.reshape(batch, spec.heads_kv, -1, weights.shape[-1]) @ v_tile
        row_max = new_max
    if sinks is not None:
        sink = sinks.to(acc_dtype).reshape(1, spec.heads_kv, spec.group, 1)
        new_max = torch.maximum(row_max, sink)
        safe_max = _finite_or_zero(new_max)
        rescale = torch.exp(row_max - safe_max)
        row_sum = row_sum * rescale + torch.exp(sink - safe_max)
        acc = acc * rescale.reshape(batch, spec.heads_kv, -1, 1)
        row_max = new_max
    lse = _finite_or_zero(row_max) + torch.log(row_sum)
    normalized = acc / row_sum.reshape(batch, spec.heads_kv, -1, 1)
    # A row that saw no key (and no sink) has row_sum == 0: its output is 0, not 0/0.
    normalized = torch.where((row_sum == 0).reshape(normalized.shape[:-1] + (1,)), 0.0, normalized)
    return ungroup(normalized, rows).to(q_tile.dtype), lse.reshape(batch, -1, rows)


def _finite_or_zero(row_max: torch.Tensor) -> torch.Tensor:
    """-inf (nothing seen yet) becomes 0 so that exp(x - max) is exp(-inf) = 0, not NaN."""
    return torch.where(row_max == -math.inf, 0.0, row_max)
