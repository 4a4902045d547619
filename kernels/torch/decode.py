"""Decode over a (possibly quantized) KV cache: split-K ("flash-decoding") with a log-sum-exp merge.

plan_decode() picks, from the shape only, how many splits the visible key range is cut into, the
key block and the query tile; decode() executes a plan. Each step of the loop takes block t of
every split at once, so the splits run side by side in one batched matmul (that is what gives a
single query row parallel work), and every split keeps its own online-softmax state; the splits
are merged at the end by their log-sum-exps. All G query heads of one KV head are stacked into one
(G * rows, D) operand, so each K/V element is read (and dequantized) once per block. A step's
keys are one strided view of the cache (the splits are equally spaced): used as it is or read by
one copy, never gathered. Quantized codes are dequantized one block at a time: the full-precision
cache never exists.

Semantics are kernels/reference.py's with Lk = seqlens_k[b] per row: query i sees key j when
j < L_b and, for causal/window, L_b - Lq + i - left <= j <= L_b - Lq + i + right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mfa_hf import kv_formats
from ..contract import CacheSide, DecodeCall
from ..launch import SplitPolicy, lse_dtype, new_output

from . import cpu_fused_decode, tiles
from .cache_blocks import KeyRuns, side_block, values_dim

# Enough independent (batch, KV head, split) work items to fill a GPU's cores or a CPU's threads;
# fewer splits leave a lone decode row serial, more only add merge work.
SPLITS = SplitPolicy(target_work=128)
DECODE_ROWS = 64  # query rows (x group) up to which splitting pays; prefill has parallel rows


@dataclass(frozen=True)
class DecodePlan:
    num_splits: int
    key_block: int  # keys of one split handled per loop step
    query_tile: int  # query rows per pass


def plan_decode(batch: int, heads_kv: int, group: int, lq: int, key_span: int, num_splits: int = 0) -> DecodePlan:
    """Splits, key block and query tile from the shape (num_splits > 0 is taken as given, capped)."""
    key_block = tiles.TILING.key_tile
    if num_splits <= 0 and group * lq > DECODE_ROWS:
        num_splits = 1
    num_splits = SPLITS.splits(batch * heads_kv, key_span, key_block, num_splits)
    per_row = max(1, batch * heads_kv * group * num_splits * key_block)
    query_tile = max(1, min(lq, tiles.TILING.max_query_tile, tiles.TILING.score_block_elements // per_row))
    return DecodePlan(num_splits, key_block, query_tile)


def decode(call: DecodeCall):
    """The torch backend's decode (kernels/contract.py DecodeCall)."""
    q, keys, values, seqlens_k, cache_batch_idx = call.q, call.keys, call.values, call.seqlens_k, call.cache_batch_idx
    k_codes, v_codes, v_format = keys.codes, values.codes, values.format
    scale, window_left, right, softcap = (call.options.scale, call.options.window_left, call.options.window_right,
                                          call.options.softcap)
    alibi_slopes, sinks, num_splits = call.alibi_slopes, call.sinks, call.num_splits
    batch, lq, heads_q, _ = q.shape
    heads_kv = k_codes.shape[2]
    acc_dtype = lse_dtype(q.dtype)
    lengths = _host_lengths(seqlens_k, cache_batch_idx, k_codes.shape[0], k_codes.shape[1])
    if cpu_fused_decode.serves(call, lengths):
        return cpu_fused_decode.decode(call, lengths[0])
    dim_v = kv_formats.spec(v_format).logical_dim(v_codes.shape[-1])
    out = new_output((batch, lq, heads_q, dim_v), q.dtype, q.device)
    lse = new_output((batch, heads_q, lq), acc_dtype, q.device)
    rows = None if cache_batch_idx is None else cache_batch_idx.to(torch.long)
    span = _visible_span(lengths, lq, 0, lq, window_left, right)
    plan = plan_decode(batch, heads_kv, heads_q // heads_kv, lq, span[1] - span[0], num_splits)
    setup = _Setup(scale, softcap, window_left, right, seqlens_k.to(q.device, torch.long), lq,
                   _grouped_slopes(alibi_slopes, batch, heads_kv, heads_q), acc_dtype, min(lengths, default=0))
    for i0 in range(0, lq, plan.query_tile):
        i1 = min(lq, i0 + plan.query_tile)
        start, end = _visible_span(lengths, lq, i0, i1, window_left, right)
        tile_out, tile_lse = _attend_tile(q[:, i0:i1], i0, keys, values, rows, start, end, plan, setup, sinks)
        out[:, i0:i1] = tile_out
        lse[:, :, i0:i1] = tile_lse
    return out, lse


def _host_lengths(seqlens_k, cache_batch_idx, cache_rows: int, capacity: int) -> list[int]:
    """The lengths on the host, where this fallback sizes its loops from them (a sync off the CPU: its price;
    the API layer trusts device values). The rows come back in the same read: both are checked here, so a
    bad value is a ValueError on every device, never an out-of-range index."""
    if cache_batch_idx is None:
        lengths, rows = seqlens_k.tolist(), []
    else:
        both = torch.cat([seqlens_k.to(torch.long), cache_batch_idx.to(torch.long)]).tolist()
        lengths, rows = both[:seqlens_k.numel()], both[seqlens_k.numel():]
    if any(not 0 <= n <= capacity for n in lengths):
        raise ValueError(f"cache_seqlens: expected lengths (new tokens included) in [0, {capacity}], the cache "
                         f"capacity, got {lengths}")
    if any(not 0 <= r < cache_rows for r in rows):
        raise ValueError(f"cache_batch_idx: expected rows in [0, {cache_rows}), got {rows}")
    return lengths


@dataclass(frozen=True)
class _Setup:
    scale: float
    softcap: float
    left: int
    right: int
    lengths: torch.Tensor  # (B,) int64 on the device
    lq: int
    slopes: torch.Tensor | None  # (B or 1, Hkv, 1, G, 1, 1) float32
    acc_dtype: torch.dtype
    shortest: int  # the shortest row's length (host): a block reaching past it reads slots some row does not own


def _grouped_slopes(alibi_slopes, batch, heads_kv, heads_q):
    if alibi_slopes is None:
        return None
    return alibi_slopes.to(torch.float32).reshape(-1, heads_kv, 1, heads_q // heads_kv, 1, 1)


def _visible_span(lengths: list[int], lq: int, i0: int, i1: int, left: int, right: int) -> tuple[int, int]:
    """Keys [start, end) that some row of query tile [i0, i1) of some sequence can see."""
    if not lengths or i1 <= i0:
        return 0, 0
    longest, shortest = max(lengths), min(lengths)
    start = 0 if left < 0 else max(0, shortest - lq + i0 - left)
    end = longest if right < 0 else min(longest, longest - lq + i1 - 1 + right + 1)
    return start, max(start, end)


def _attend_tile(q_tile, i0, keys: CacheSide, values: CacheSide, rows, start, end, plan, setup: _Setup, sinks):
    batch, tile_rows, heads_q, dim = q_tile.shape
    heads_kv = keys.codes.shape[2]
    group = heads_q // heads_kv
    splits = max(1, min(plan.num_splits, math.ceil((end - start) / plan.key_block)))
    split_len = math.ceil((end - start) / splits)
    # (B, Hkv, 1, G * rows, D): every query head of a KV head in one operand, broadcast over splits.
    q4 = q_tile.reshape(batch, tile_rows, heads_kv, group, dim).permute(0, 2, 3, 1, 4)
    # (B, Hkv, G * rows, D), the softmax scale folded in once instead of scaling every score block.
    q4 = q4.reshape(batch, heads_kv, group * tile_rows, dim).to(setup.acc_dtype) * setup.scale
    state = (batch, heads_kv, splits, group, tile_rows)
    row_max = q4.new_full(state, -math.inf)
    row_sum = q4.new_zeros(state)
    acc = None
    query_pos = torch.arange(i0, i0 + tile_rows, device=q_tile.device)
    for step in range(0, split_len, plan.key_block):
        offsets = torch.arange(step, min(split_len, step + plan.key_block), device=q_tile.device)
        positions = start + torch.arange(splits, device=q_tile.device)[:, None] * split_len + offsets  # (P, BK)
        in_range = positions < end
        window = KeyRuns(start + step, split_len, splits, offsets.numel())
        k_block = side_block(keys, window, rows, setup.acc_dtype)  # (B, Hkv, P * BK, D)
        v_block = side_block(values, window, rows, setup.acc_dtype)
        if start + (splits - 1) * split_len + step + offsets.numel() > setup.shortest:
            # Slots past a row's length (an empty or reused cache: any bits, NaN too) get weight 0, and 0 x NaN is
            # NaN: their values are zeroed for that row. Scores are masked to -inf, which replaces NaN already.
            beyond = positions[None] >= setup.lengths[:, None, None]  # (B, P, BK)
            v_block = v_block.masked_fill(beyond.reshape(batch, 1, -1, 1), 0.0)
        scores = _block_scores(q4, k_block, splits, positions, in_range, query_pos, setup, group, tile_rows)
        new_max = torch.maximum(row_max, scores.amax(dim=-1))
        safe_max = _finite_or_zero(new_max)
        weights = scores.sub_(safe_max[..., None]).exp_()
        rescale = torch.exp(row_max - safe_max)
        row_sum = row_sum * rescale + weights.sum(dim=-1)
        flat_weights = weights.reshape(batch, heads_kv, splits, group * tile_rows, -1)
        partial = flat_weights @ v_block.reshape(batch, heads_kv, splits, -1, v_block.shape[-1])
        acc = partial if acc is None else acc * rescale.reshape(*partial.shape[:-1], 1) + partial
        row_max = new_max
    if acc is None:  # no key visible anywhere: every row is empty
        acc = q4.new_zeros(batch, heads_kv, splits, group * tile_rows, values_dim(values))
    return _merge_splits(row_max, row_sum, acc, sinks, q_tile.dtype, tile_rows)


def _block_scores(q4, k_block, splits, positions, in_range, query_pos, setup: _Setup, group, tile_rows):
    """Logits (B, Hkv, P, G, rows, BK) of one step, -inf where a key is not visible."""
    batch, heads_kv = k_block.shape[:2]
    # One product for every split: (B, Hkv, G * rows, D) x (B, Hkv, D, P * BK).
    raw = torch.matmul(q4, k_block.transpose(-1, -2))
    scores = raw.reshape(batch, heads_kv, group, tile_rows, splits, -1).permute(0, 1, 4, 2, 3, 5)
    if setup.softcap > 0:
        scores = setup.softcap * torch.tanh(scores / setup.softcap)
    # distance i + L_b - Lq - j from each key to its query's diagonal: (B, P, rows, BK)
    diagonal = setup.lengths[:, None] - setup.lq + query_pos[None, :]  # (B, rows)
    distance = diagonal[:, None, :, None] - positions[None, :, None, :]
    key_ok = in_range[None] & (positions[None] < setup.lengths[:, None, None])  # (B, P, BK)
    visible = key_ok[:, :, None, :].expand_as(distance)
    if setup.left >= 0:
        visible = visible & (distance <= setup.left)
    if setup.right >= 0:
        visible = visible & (distance >= -setup.right)
    visible = visible[:, None, :, None]  # (B, 1, P, 1, rows, BK): same for every head
    if setup.slopes is not None:
        scores = scores - setup.slopes * distance[:, None, :, None].abs().to(scores.dtype)
    return scores.masked_fill(~visible, -math.inf)


def _merge_splits(row_max, row_sum, acc, sinks, out_dtype, tile_rows):
    """Combine per-split (max, sum, acc) by their log-sum-exps; sinks join the denominator."""
    batch, heads_kv, splits, group, _ = row_max.shape
    best = row_max.amax(dim=2)  # (B, Hkv, G, rows)
    if sinks is not None:
        best = torch.maximum(best, sinks.to(best.dtype).reshape(1, heads_kv, group, 1))
    safe = _finite_or_zero(best)
    weight = torch.exp(row_max - safe[:, :, None])  # (B, Hkv, P, G, rows)
    total = (row_sum * weight).sum(dim=2)
    if sinks is not None:
        total = total + torch.exp(sinks.to(best.dtype).reshape(1, heads_kv, group, 1) - safe)
    merged = (acc * weight.reshape(batch, heads_kv, splits, -1, 1)).sum(dim=2)  # (B, Hkv, G * rows, Dv)
    lse = safe + torch.log(total)
    flat_total = total.reshape(batch, heads_kv, -1, 1)
    normalized = torch.where(flat_total == 0, 0.0, merged / flat_total)  # a row that saw nothing is 0
    out = normalized.reshape(batch, heads_kv * group, tile_rows, -1).transpose(1, 2)  # (B, rows, Hq, Dv)
    return out.to(out_dtype), lse.reshape(batch, heads_kv * group, tile_rows)


def _finite_or_zero(row_max: torch.Tensor) -> torch.Tensor:
    return torch.where(row_max == -math.inf, 0.0, row_max)
