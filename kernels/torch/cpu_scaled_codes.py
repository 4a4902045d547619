"""One query row per sequence over codes whose scales factor out of the products: widen, multiply, scale after.

With a single scale s per (token, head) (or per head), a key is k = s_k c and a value v = s_v c, so both scales
factor out of the two products: q.k = s_k (q.c) and sum_j p_j v_j = sum_j (p_j s_v,j) c_j. The codes are
then only widened to float32 (exactly, into a buffer that both sides and every chunk of the call reuse, heads
first: int8 in one converting copy, float8 bytes and nf4 byte pairs through their format's 256-entry table), the
key scales multiply the scores and the value scales the probabilities, which are small (G rows per key instead of
D columns).

Scales per group of D (nf4: one per 32 or 64 values of a key) factor the same way group by group: q.k =
sum_g s_k,g (q_g.c_g), one product per group over its slice of D, scaled, then summed; value group g of the
output is sum_j (p_j s_v,j,g) c_j,g, one product per group with the weights scaled by that group's scales. A head
dim of one group (nf4 at D 64) is the per-key case.

Why not dequantize and call torch's fused kernel (cpu_fused_decode's other path): codes * scales costs torch's
CPU type promotion a full float copy of the codes plus the multiply, and the fused kernel ran about 2x slower
on a (B, S, H, D) chunk viewed heads first than on a heads-first one.
Measured on a noisy 2-core x86 host, smollm-shaped int8 at 8k keys (benchmarks/cpu_quant_decode.py, medians):
about 1.5-2.3 ms a call against 2.6-4.1 ms before, SDPA on the float32 cache 1.0-1.2 ms. For fp8 the table
matters: torch's float8 -> float32 conversion is slow on CPU (4M codes: 6.4 ms, the table 2.8 ms).

The keys [start, length) are cut into chunks of WIDE_BYTES of widened codes (one side at a time: the
full-precision cache never exists); each chunk is one exact softmax (all its keys are visible: the window
only moves `start`), and cpu_fused_decode merges the chunks by their log-sum-exps. Few large chunks win on
that host (8k keys: 1 MiB chunks 1.5-1.9x the time of 8 MiB ones): each chunk's dozen small ops cost more than
keeping its widened codes in L2 saves.
"""

from __future__ import annotations

import torch

from mfa_hf import kv_formats
from ..contract import CacheSide, DecodeCall
from ..launch import new_output
from .cache_blocks import values_dim

ENABLED = True  # read at call time: tests turn it off to cover the flash-chunk path with the same formats
# Widened codes of one side per chunk (float32): 8 MiB holds a smollm-shaped layer's 8k keys in one chunk.
WIDE_BYTES = 8 << 20


def serves(call: DecodeCall) -> bool:
    """Whether both sides are codes that widen exactly with scales that factor out: one per key and head (int8,
    fp8 per token or per head) or one per key, head and group of D (nf4); not per-channel scales."""
    return ENABLED and _factorable(call.keys) and _factorable(call.values)


def _factorable(side: CacheSide) -> bool:
    if side.format == "none":
        return False
    # A grouped format has one scale per token, head and group of D; others need one per token (or head), not
    # one per channel.
    return kv_formats.spec(side.format).grouped or side.scales.shape[-1] == 1


def parts(call: DecodeCall, start: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(out (B, 1, Hq, Dv) float32, lse (B, Hq, 1) float32) of each chunk of keys [start, length)."""
    q, keys, values = call.q, call.keys, call.values
    batch, _, heads_q, dim = q.shape
    heads_kv = keys.codes.shape[2]
    dim_v = values_dim(values)
    # (B * Hkv, G, D): the G query heads of a KV head are the rows of one product; the scale folded in once.
    rows = q.reshape(batch * heads_kv, heads_q // heads_kv, dim).to(torch.float32) * call.options.scale
    chunk = max(1, WIDE_BYTES // (batch * heads_kv * max(dim, dim_v) * 4))
    count = min(chunk, length - start)
    # One buffer for both sides and every chunk (a side's widened codes are dead once its product ran).
    wide = new_output((batch * heads_kv * count * max(dim, dim_v),), torch.float32, q.device)
    found = []
    for first in range(start, length, chunk):
        count = min(chunk, length - first)
        k_wide = _widen(keys, first, count, wide)  # (B * Hkv, count, D)
        products = _key_group_products(rows, k_wide, _groups(keys))  # (B * Hkv, G, key groups, count)
        scores = _group_sum(scale_per_key(products, keys, first, count, batch))  # (B * Hkv, G, count)
        # No -inf to guard: every key of the chunk is visible (the window only moved `start`); a NaN or inf code
        # turns its KV head's rows NaN, as in the reference.
        top = scores.amax(dim=-1, keepdim=True)
        weights = scores.sub_(top).exp_()
        total = weights.sum(dim=-1, keepdim=True)  # >= 1 (the top key's weight)
        groups_v = _groups(values)
        # (B * Hkv, G, value groups, count): group g's weights times its scales
        weights = weights.unsqueeze(2) if groups_v == 1 else weights[:, :, None].repeat(1, 1, groups_v, 1)
        scale_per_key(weights, values, first, count, batch)
        out = _value_group_products(weights, _widen(values, first, count, wide)).div_(total)  # (B * Hkv, G, Dv)
        lse = top.add_(total.log_())
        found.append((out.reshape(batch, 1, heads_q, dim_v), lse.reshape(batch, heads_q, 1)))
    return found


def _groups(side: CacheSide) -> int:
    """Scales per key and head: 1, or the groups of D of a grouped format."""
    return side.scales.shape[-1]


def _group_sum(products: torch.Tensor) -> torch.Tensor:
    """(N, G, groups, n) -> (N, G, n), summed over the groups (one group: a view, no op)."""
    return products.squeeze(2) if products.shape[2] == 1 else products.sum(dim=2)


def _key_group_products(rows: torch.Tensor, keys: torch.Tensor, groups: int) -> torch.Tensor:
    """rows (N, G, D) . keys (N, n, D) per group of D: (N, G, groups, n), group g's partial dot products. One bmm
    per group over its slice of D, not one over zero-padded rows: that rounded the partial dots about twice as
    coarsely (MKL's small-M kernel)."""
    width = rows.shape[-1] // groups
    parts = [torch.bmm(rows[..., g * width:(g + 1) * width], keys[..., g * width:(g + 1) * width].transpose(1, 2))
             for g in range(groups)]
    return parts[0].unsqueeze(2) if groups == 1 else torch.stack(parts, dim=2)  # one group: a view, no copy


def _value_group_products(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """weights (N, G, groups, n) @ values (N, n, Dv) per group of Dv: (N, G, Dv), group g of the output from group
    g's weights."""
    groups = weights.shape[2]
    width = values.shape[-1] // groups
    parts = [torch.bmm(weights[:, :, g], values[..., g * width:(g + 1) * width]) for g in range(groups)]
    return parts[0] if groups == 1 else torch.cat(parts, dim=-1)


def _widen(side: CacheSide, first: int, count: int, wide: torch.Tensor) -> torch.Tensor:
    """Codes of positions [first, first + count), every row and head, as float32 (B * H, count, D), exact."""
    codes = side.codes[:, first:first + count]
    fmt = kv_formats.spec(side.format)
    batch, _, heads, stored = codes.shape
    dim = fmt.logical_dim(stored)
    out = wide[:batch * heads * count * dim].view(batch, heads, count, dim)
    # int8 converts in one copy that also lays the heads out first for the product; float8 bytes and nf4 byte
    # pairs go through their format's table of values (torch's float8 conversion is slow on CPU).
    fmt.decode_into(codes.transpose(1, 2), out)
    return out.view(batch * heads, count, dim)


def scale_per_key(per_key: torch.Tensor, side: CacheSide, first: int, count: int, batch: int) -> torch.Tensor:
    """per_key (B * Hkv, rows, [groups,] count) *= the side's scale of each key (per token, or one per head) and
    group of D; returned."""
    scales = side.scales  # (B or 1, S or 1, Hkv, groups)
    if scales.shape[1] > 1:
        scales = scales[:, first:first + count]
    heads, groups = scales.shape[2], scales.shape[3]
    per_key.view(batch, heads, -1, groups, count).mul_(scales.permute(0, 2, 3, 1)[:, :, None])
    return per_key
