"""Which tokens each rank holds: the caller's natural order, and the zig-zag order that balances causal work.

The caller's rank r holds tokens [r*n, (r+1)*n). Under a causal mask the last rank's queries see every
key and the first rank's see only their own, so ring steps would leave most ranks idle. Zig-zag splits
the sequence into 2P chunks and gives rank r chunks r and 2P-1-r: every rank then holds one early and
one late chunk and does the same work. `redistribute` moves a tensor between two layouts of the same
chunk size (only the chunks that change owner travel, point to point).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .comm import Group, post

UNBOUNDED = -1


@dataclass(frozen=True)
class Layout:
    """chunk: tokens per chunk; owners[r]: the chunk indices rank r holds, in the order it stores them."""

    chunk: int
    owners: tuple[tuple[int, ...], ...]

    def segments(self, rank: int) -> list[tuple[int, int]]:
        """(global start, length) of each run of tokens rank r holds, in storage order."""
        return [(c * self.chunk, self.chunk) for c in self.owners[rank]]

    def owner_of(self, chunk: int) -> tuple[int, int]:
        """(rank, position in that rank's storage) of a chunk."""
        for rank, chunks in enumerate(self.owners):
            if chunk in chunks:
                return rank, chunks.index(chunk)
        raise KeyError(chunk)


def natural(size: int, length: int, pieces: int = 1) -> Layout:
    """Rank r holds its contiguous shard, cut into `pieces` chunks."""
    return Layout(length // pieces, tuple(tuple(range(r * pieces, (r + 1) * pieces)) for r in range(size)))


def zigzag(size: int, length: int) -> Layout:
    return Layout(length // 2, tuple((r, 2 * size - 1 - r) for r in range(size)))


def balances(size: int, window: tuple[int, int], *lengths: int) -> bool:
    """Whether zig-zag evens the work out: a window unbounded on exactly one side (causal without a
    left bound, or its mirror), more than one rank, and shards that split in two."""
    one_sided = (window[0] == UNBOUNDED) != (window[1] == UNBOUNDED)
    return size > 1 and one_sided and all(n % 2 == 0 and n > 0 for n in lengths)


def redistribute(group: Group, x: torch.Tensor, dim: int, source: Layout, target: Layout, tag: int = 0) -> torch.Tensor:
    """x holds this rank's chunks of `source` along `dim`; returns its chunks of `target`."""
    mine = x.split(source.chunk, dim=dim)
    pieces: dict[int, torch.Tensor] = {}
    sends, receives, expected = [], [], []
    for position, chunk in enumerate(source.owners[group.rank]):
        owner, _ = target.owner_of(chunk)
        if owner == group.rank:
            pieces[chunk] = mine[position]
        else:
            sends.append((mine[position], owner, tag + chunk))
    for chunk in target.owners[group.rank]:
        if chunk not in pieces:
            holder, _ = source.owner_of(chunk)
            receives.append((mine[0], holder, tag + chunk))
            expected.append(chunk)
    for chunk, tensor in zip(expected, post(group, sends, receives).wait()):
        pieces[chunk] = tensor
    return torch.cat([pieces[c] for c in target.owners[group.rank]], dim=dim)
