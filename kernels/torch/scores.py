"""Score blocks for the torch backend, in the grouped layout that serves GQA without repeating K/V.

Queries of one KV head are stacked: (B, Hkv, G * BQ, D) @ (B, Hkv, D, BK) gives the scores of all G
query heads that share a KV head in one matmul, so each K/V element is read once per block and the
dK/dV products sum over the group for free. Score blocks are (B, Hkv, G, BQ, BK) float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..dropout import keep_mask
from .products import FullPrecision
from .tiles import Band, Block


@dataclass(frozen=True)
class ScoreSpec:
    """Everything that turns q.k products into the logits of record, fixed for one call."""

    scale: float
    softcap: float
    band: Band
    heads_kv: int
    group: int
    alibi: torch.Tensor | None  # (B or 1, Hkv, G, 1, 1) float32
    mask: torch.Tensor | None  # (mB, mH, Lq, Lk) view, mB in {1, B}, mH in {1, Hq}
    mask_shape: tuple[int, ...] | None  # the mask's own 4-D shape (size-1 dims broadcast)
    dropout_p: float
    dropout_seed: torch.Tensor | None
    batch_offset: int  # batch index of row 0 for the dropout hash (varlen sequence number)


def make_spec(q, k, scale, softcap, band, alibi_slopes, attn_mask, dropout_p, dropout_seed, batch_offset):
    batch, _, heads_q, _ = q.shape
    heads_kv = k.shape[2]
    group = heads_q // heads_kv
    alibi = None
    if alibi_slopes is not None:
        alibi = alibi_slopes.to(torch.float32).reshape(-1, heads_kv, group, 1, 1)
    mask = mask_shape = None
    if attn_mask is not None:
        mask_shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
        mask4 = attn_mask.reshape(mask_shape)
        mask = mask4.expand(mask4.shape[0], mask4.shape[1], band.lq, band.lk)
    seed = None if dropout_seed is None else dropout_seed.to(q.device)
    return ScoreSpec(
        scale, softcap, band, heads_kv, group, alibi, mask, mask_shape, dropout_p, seed, batch_offset
    )


def grouped_queries(q_tile: torch.Tensor, heads_kv: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, BQ, Hq, D) -> (B, Hkv, G * BQ, D) in the accumulation dtype."""
    batch, rows, heads_q, dim = q_tile.shape
    grouped = q_tile.reshape(batch, rows, heads_kv, heads_q // heads_kv, dim).permute(0, 2, 3, 1, 4)
    return grouped.reshape(batch, heads_kv, -1, dim).to(dtype)


def ungroup(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, Hkv, G * BQ, D) -> (B, BQ, Hq, D)."""
    batch, heads_kv, _, dim = x.shape
    return x.reshape(batch, heads_kv, -1, rows, dim).permute(0, 3, 1, 2, 4).reshape(batch, rows, -1, dim)


def heads_last(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, BK, Hkv, D) -> (B, Hkv, BK, D) in the accumulation dtype."""
    return x.permute(0, 2, 1, 3).to(dtype)


def block_scores(
    spec: ScoreSpec, q5: torch.Tensor, k_tile: torch.Tensor, block: Block, products=FullPrecision
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits of one block, -inf where not visible, and tanh(raw / softcap) for the backward.
    products: how q.k is multiplied (products.py; the backward's bf16_backward)."""
    batch, heads_kv = q5.shape[0], q5.shape[1]
    rows, cols = block.i1 - block.i0, block.j1 - block.j0
    # One fused product-and-scale: (B * Hkv, G * BQ, D) x (B * Hkv, D, BK), times scale.
    q3 = q5.reshape(batch * heads_kv, -1, q5.shape[-1])
    k3 = k_tile.transpose(-1, -2).reshape(batch * heads_kv, k_tile.shape[-1], cols)
    raw = products.scores(q3, k3, spec.scale)
    scores = raw.reshape(batch, heads_kv, spec.group, rows, cols)
    capped = None
    if spec.softcap > 0:
        capped = torch.tanh(scores / spec.softcap)
        scores = spec.softcap * capped
    if spec.alibi is not None:
        scores = scores - spec.alibi * _diagonal_distance(spec.band, block, q5.device).abs().to(torch.float32)
    if spec.mask is not None:
        tile = _mask_tile(spec, block)
        if tile.dtype == torch.bool:
            scores = scores.masked_fill(~tile, -math.inf)
        else:
            scores = scores + tile.to(scores.dtype)
    if block.needs_band_mask:
        scores = scores.masked_fill(~band_mask(spec.band, block, q5.device), -math.inf)
    return scores, capped


def band_mask(band: Band, block: Block, device: torch.device) -> torch.Tensor:
    offset = _diagonal_distance(band, block, device)  # i + Lk - Lq - j
    ok = torch.ones_like(offset, dtype=torch.bool)
    if band.left >= 0:
        ok &= offset <= band.left
    if band.right >= 0:
        ok &= offset >= -band.right
    return ok


def _diagonal_distance(band: Band, block: Block, device: torch.device) -> torch.Tensor:
    """i + Lk - Lq - j in int64: float32 positions are exact only up to 2**24, so windows over longer
    sequences were cut at the wrong keys."""
    i = torch.arange(block.i0, block.i1, device=device, dtype=torch.int64)[:, None]
    j = torch.arange(block.j0, block.j1, device=device, dtype=torch.int64)[None, :]
    return i + band.diagonal - j


def _mask_tile(spec: ScoreSpec, block: Block) -> torch.Tensor:
    tile = spec.mask[:, :, block.i0 : block.i1, block.j0 : block.j1]
    if tile.shape[1] == 1:
        return tile.unsqueeze(2)
    return tile.reshape(tile.shape[0], spec.heads_kv, spec.group, tile.shape[2], tile.shape[3])


def dropout_keep(spec: ScoreSpec, batch: int, block: Block, device: torch.device) -> torch.Tensor:
    heads_q = spec.heads_kv * spec.group
    first = spec.batch_offset * heads_q
    batch_head = torch.arange(first, first + batch * heads_q, device=device)
    batch_head = batch_head.reshape(batch, spec.heads_kv, spec.group, 1, 1)
    rows = torch.arange(block.i0, block.i1, device=device)
    cols = torch.arange(block.j0, block.j1, device=device)
    return keep_mask(spec.dropout_seed, batch_head, rows, cols, spec.dropout_p)


def add_mask_grad(spec: ScoreSpec, grad_mask: torch.Tensor, dscores: torch.Tensor, block: Block) -> None:
    """Sum a (B, Hkv, G, BQ, BK) score gradient into the additive mask's own (broadcast) shape."""
    batch, _, _, rows, cols = dscores.shape
    grad = dscores.reshape(batch, -1, rows, cols)
    rows_slice, cols_slice = slice(block.i0, block.i1), slice(block.j0, block.j1)
    for dim, size in enumerate(spec.mask_shape):
        if size == 1 and grad.shape[dim] != 1:
            grad = grad.sum(dim, keepdim=True)
    if spec.mask_shape[2] == 1:
        rows_slice = slice(0, 1)
    if spec.mask_shape[3] == 1:
        cols_slice = slice(0, 1)
    grad_mask[:, :, rows_slice, cols_slice] += grad
