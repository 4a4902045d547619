"""Tiling of the score matrix for the chunked torch backend: which blocks exist and which need masks.

Scores are never held beyond one (query tile x key tile) block for all heads at once. Blocks that
causal/window masking empties are never visited; blocks entirely inside the visible band skip the
element-wise band mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

# Elements of one fp32 score block across all heads (16 MiB): large enough for efficient matmuls,
# small enough that the O(N) guarantee is a small constant.
SCORE_BLOCK_ELEMENTS = 1 << 22
KEY_TILE = 512
MIN_QUERY_TILE = 16


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


def make_band(lq: int, lk: int, causal: bool, window_left: int, window_right: int) -> Band:
    return Band(lq, lk, window_left, 0 if causal else window_right)


def query_tile(batch_heads: int, lq: int, key_tile: int = KEY_TILE) -> int:
    """Rows per query tile so that one score block stays within SCORE_BLOCK_ELEMENTS."""
    rows = SCORE_BLOCK_ELEMENTS // max(1, batch_heads * key_tile)
    return max(1, min(lq, max(MIN_QUERY_TILE, rows)))


def query_tiles(lq: int, tile: int) -> Iterator[tuple[int, int]]:
    for i0 in range(0, lq, tile):
        yield i0, min(lq, i0 + tile)


def key_blocks(band: Band, i0: int, i1: int, key_tile: int = KEY_TILE) -> Iterator[Block]:
    start, end = band.key_range(i0, i1)
    for j0 in range(start, end, key_tile):
        j1 = min(end, j0 + key_tile)
        yield Block(i0, i1, j0, j1, not band.fully_visible(i0, i1, j0, j1))
