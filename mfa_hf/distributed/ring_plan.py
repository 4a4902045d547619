"""What each rank computes at each ring step: the blocks of (its queries) x (the keys it holds then).

At step s rank r holds the keys of rank (r - s) mod P. Every rank derives the same plan from the
shapes, the window and the packing, so ranks agree without talking: in particular on `last_step`, after
which no rank sees any key it has not met yet, so the ring stops early under a sliding window (and its
K/V stop travelling) instead of passing blocks nobody attends to.

The token stream may be packed (varlen): sequence b is queries [offsets_q[b], offsets_q[b+1]) and keys
[offsets_k[b], offsets_k[b+1]) of the global stream, each its own attention problem aligned bottom-right
within itself. A dense shard is the packing of one sequence. A (query run, key run) pair then yields one
block per sequence both runs overlap, in that sequence's positions.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from .blocks import Block, plan_block
from .layout import Layout, balances, natural, zigzag


SCORES_PER_KEY_SENT = 64  # a K/V token's hop ~ this many score entries' compute (a cost model, not measured)


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
    window: tuple[int, int]
    offsets_q: tuple[int, ...]  # the global packing (one sequence: (0, P * q_len))
    offsets_k: tuple[int, ...]

    @classmethod
    def build(cls, size: int, q_len: int, k_len: int, window: tuple[int, int],
              offsets_q: Optional[tuple[int, ...]] = None, offsets_k: Optional[tuple[int, ...]] = None) -> "RingPlan":
        """q_len, k_len: the tokens per rank; offsets: the global packing (None: one sequence). Zig-zag
        when it balances the work (layout.balances); for several packed sequences only when it also
        shortens the ring's critical path (many short sequences are balanced by natural order already,
        and zig-zag would make their ring longer)."""
        packing = tuple(offsets_q or (0, size * q_len)), tuple(offsets_k or (0, size * k_len))
        plain = cls(size, natural(size, q_len), natural(size, k_len), window, *packing)
        if not balances(size, window, q_len, k_len):
            return plain
        zigzagged = cls(size, zigzag(size, q_len), zigzag(size, k_len), window, *packing)
        if len(packing[0]) == 2:
            return zigzagged
        return min((plain, zigzagged), key=RingPlan.critical_path)

    @property
    def balanced(self) -> bool:
        return len(self.q_layout.owners[0]) == 2

    def pieces(self, rank: int, step: int) -> list[Piece]:
        source = (rank - step) % self.size
        found = []
        q_chunk, k_chunk = self.q_layout.chunk, self.k_layout.chunk
        for i, (q_start, q_len) in enumerate(self.q_layout.segments(rank)):
            for j, (k_start, k_len) in enumerate(self.k_layout.segments(source)):
                for block in self._blocks(q_start, q_len, k_start, k_len):
                    found.append(_piece(block, i * q_chunk, j * k_chunk))
        return found

    def _blocks(self, q_start: int, q_len: int, k_start: int, k_len: int) -> list[Block]:
        """The visible blocks of global query run [q_start, +q_len) x key run [k_start, +k_len), one per
        sequence both overlap, with offsets relative to the runs' starts."""
        found = []
        first = max(bisect_right(self.offsets_q, q_start) - 1, 0)
        for b in range(first, len(self.offsets_q) - 1):
            sq0, sq1, sk0, sk1 = self.offsets_q[b], self.offsets_q[b + 1], self.offsets_k[b], self.offsets_k[b + 1]
            if sq0 >= q_start + q_len:
                break
            rows0, rows1 = max(sq0, q_start), min(sq1, q_start + q_len)
            keys0, keys1 = max(sk0, k_start), min(sk1, k_start + k_len)
            if rows0 >= rows1 or keys0 >= keys1:
                continue
            shift = (sk1 - sk0) - (sq1 - sq0)  # bottom-right: query i of the sequence sits on key i + shift
            block = plan_block(rows0 - sq0 + shift, rows1 - rows0, keys0 - sk0, keys1 - keys0, self.window)
            if block is not None:
                found.append(Block(block.q0 + rows0 - q_start, block.q1 + rows0 - q_start,
                                   block.k0 + keys0 - k_start, block.k1 + keys0 - k_start, block.window))
        return found

    def critical_path(self) -> int:
        """The ring's time in score-matrix entries: each step lasts as long as its slowest rank's blocks,
        or its K/V hop when that is longer (SCORES_PER_KEY_SENT per key token), the ranks waiting for
        each other at every hop."""
        def work(rank, step):
            return sum((p.rows.stop - p.rows.start) * (p.keys.stop - p.keys.start) for p in self.pieces(rank, step))

        hop = SCORES_PER_KEY_SENT * self.k_layout.chunk * len(self.k_layout.owners[0])
        return sum(max([work(r, s) for r in range(self.size)] + [hop if s else 0]) for s in range(self.last_step + 1))

    @cached_property
    def last_step(self) -> int:
        """The last step at which any rank has work (0: every rank attends only to its own keys)."""
        busy = [s for s in range(self.size) if any(self.pieces(r, s) for r in range(self.size))]
        return max(busy, default=0)


def _piece(block: Block, q_offset: int, k_offset: int) -> Piece:
    return Piece(slice(q_offset + block.q0, q_offset + block.q1), slice(k_offset + block.k0, k_offset + block.k1),
                 block.window)
