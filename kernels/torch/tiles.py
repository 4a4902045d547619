"""Tiling of the score matrix for the chunked torch backend: which blocks exist and which need masks.

Scores are never held beyond one (query tile x key tile) block for all heads at once. Blocks that
causal/window masking empties are never visited; blocks entirely inside the visible band skip the
element-wise band mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator



@dataclass
class Tiling:
    """Tile sizes, read at call time so tests can shrink them to cross many block boundaries."""

    # Elements of one fp32 score block across all heads (16 MiB): large enough for efficient
    # matmuls, small enough that the O(N) guarantee has a small constant.
    score_block_elements: int = 1 << 22
    key_tile: int = 512
    min_query_tile: int = 16
    # Square-ish blocks let causal/window skipping drop whole blocks instead of masking them.
    max_query_tile: int = 512


TILING = Tiling()


@dataclass(frozen=True)
class Band:
    """The visible band of a (Lq, Lk) problem: key j visible from query i when lo(i) <= j <= hi(i)."""

    lq: int
    lk: int
    left: int  # -1: unbounded
    right: int  # -1: unbounded

    @property
    def diagonal(self) -> int:
        return self.lk - self.lq

    def key_range(self, i0: int, i1: int) -> tuple[int, int]:
        """Keys [start, end) visible from at least one query in [i0, i1)."""
        start = 0 if self.left < 0 else max(0, i0 + self.diagonal - self.left)
        end = self.lk if self.right < 0 else min(self.lk, i1 - 1 + self.diagonal + self.right + 1)
        return start, max(start, end)

    def fully_visible(self, i0: int, i1: int, j0: int, j1: int) -> bool:
        """True when every (i, j) in the block is inside the band (no element mask needed)."""
        left_ok = self.left < 0 or j0 >= i1 - 1 + self.diagonal - self.left
        right_ok = self.right < 0 or j1 - 1 <= i0 + self.diagonal + self.right
        return left_ok and right_ok


@dataclass(frozen=True)
class Block:
    i0: int
    i1: int
    j0: int
    j1: int
    needs_band_mask: bool


def make_band(lq: int, lk: int, window_left: int, window_right: int) -> Band:
    """The band of a (causal-folded) window (kernels/contract.py)."""
    return Band(lq, lk, window_left, window_right)


def query_tile(batch_heads: int, lq: int) -> int:
    """Rows per query tile so that one score block stays within TILING.score_block_elements."""
    rows = TILING.score_block_elements // max(1, batch_heads * TILING.key_tile)
    return max(1, min(lq, TILING.max_query_tile, max(TILING.min_query_tile, rows)))


def query_tiles(lq: int, tile: int) -> Iterator[tuple[int, int]]:
    for i0 in range(0, lq, tile):
        yield i0, min(lq, i0 + tile)


def key_blocks(band: Band, i0: int, i1: int) -> Iterator[Block]:
    start, end = band.key_range(i0, i1)
    for j0 in range(start, end, TILING.key_tile):
        j1 = min(end, j0 + TILING.key_tile)
        yield Block(i0, i1, j0, j1, not band.fully_visible(i0, i1, j0, j1))
