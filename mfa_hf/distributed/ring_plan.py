"""What each rank computes at each ring step: the blocks of (its queries) x (the keys it holds then).

At step s rank r holds the keys of rank (r - s) mod P. Every rank derives the same plan from the
shapes and the window, so ranks agree without talking: in particular on `last_step`, after which no
rank sees any key it has not met yet, so the ring stops early under a sliding window (and its K/V stop
travelling) instead of passing blocks nobody attends to.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .blocks import Block, plan_block
from .layout import Layout, balances, natural, zigzag


@dataclass(frozen=True)
class Piece:
    """A block in this rank's storage coordinates: query rows and key rows as slices, and its window."""

    rows: slice
    keys: slice
    window: tuple[int, int]


@dataclass(frozen=True)
class RingPlan:
    size: int
    q_layout: Layout
    k_layout: Layout
    q_shift: int  # Nk - Nq: bottom-right alignment puts query i on key i + q_shift
    window: tuple[int, int]

    @classmethod
    def build(cls, size: int, q_len: int, k_len: int, window: tuple[int, int]) -> "RingPlan":
        """q_len, k_len: the tokens per rank. Zig-zag when it balances the work (layout.balances)."""
        if balances(size, window, q_len, k_len):
            layouts = zigzag(size, q_len), zigzag(size, k_len)
        else:
            layouts = natural(size, q_len), natural(size, k_len)
        return cls(size, *layouts, size * (k_len - q_len), window)

    @property
    def balanced(self) -> bool:
        return len(self.q_layout.owners[0]) == 2

    def pieces(self, rank: int, step: int) -> list[Piece]:
        source = (rank - step) % self.size
        found = []
        q_chunk, k_chunk = self.q_layout.chunk, self.k_layout.chunk
        for i, (q_start, q_len) in enumerate(self.q_layout.segments(rank)):
            for j, (k_start, k_len) in enumerate(self.k_layout.segments(source)):
                block = plan_block(q_start + self.q_shift, q_len, k_start, k_len, self.window)
                if block is not None:
                    found.append(_piece(block, i * q_chunk, j * k_chunk))
        return found

    @cached_property
    def last_step(self) -> int:
        """The last step at which any rank has work (0: every rank attends only to its own keys)."""
        busy = [s for s in range(self.size) if any(self.pieces(r, s) for r in range(self.size))]
        return max(busy, default=0)


def _piece(block: Block, q_offset: int, k_offset: int) -> Piece:
    return Piece(slice(q_offset + block.q0, q_offset + block.q1), slice(k_offset + block.k0, k_offset + block.k1),
                 block.window)
