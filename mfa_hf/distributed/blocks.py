"""Which part of one (query segment, key segment) pair a window lets attend, as a kernel call.

Ring attention sees the global problem one block at a time: a contiguous run of query rows against a
contiguous run of keys, both named by their global positions. The window rule is global (key j is
visible from query i when i - left <= j <= i + right, with query positions already shifted by Nk - Nq,
kernels/reference.py), but a kernel aligns its window bottom-right on the block it is handed. So the
block is trimmed to the rows that see at least one of its keys and the keys that at least one of them
sees, and the window is re-expressed relative to the trimmed block's ends: left + (k_end - q_end) and
right - (k_end - q_end). After trimming both are >= 0 (or -1, unbounded), which every backend takes.
A block nobody sees is None: its ring step does no work for that pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

UNBOUNDED = -1


@dataclass(frozen=True)
class Block:
    """Rows [q0, q1) of the query segment against keys [k0, k1) of the key segment (offsets inside
    each segment), with the window the kernel must apply to that slice."""

    q0: int
    q1: int
    k0: int
    k1: int
    window: tuple[int, int]


def plan_block(q_start: int, q_len: int, k_start: int, k_len: int, window: tuple[int, int]) -> Optional[Block]:
    """The visible part of queries [q_start, q_start + q_len) x keys [k_start, k_start + k_len) (global,
    query positions shifted onto key positions), or None when no query sees any key there."""
    left, right = window
    rows_lo, rows_hi = q_start, q_start + q_len
    keys_lo, keys_hi = k_start, k_start + k_len
    if right != UNBOUNDED:  # query i sees nothing here when i + right < keys_lo
        rows_lo = max(rows_lo, keys_lo - right)
    if left != UNBOUNDED:  # ... or when i - left >= keys_hi
        rows_hi = min(rows_hi, keys_hi + left)
    if rows_lo >= rows_hi or keys_lo >= keys_hi:
        return None
    if left != UNBOUNDED:
        keys_lo = max(keys_lo, rows_lo - left)
    if right != UNBOUNDED:
        keys_hi = min(keys_hi, rows_hi + right)  # the last row's last visible key, + 1
    if keys_lo >= keys_hi:
        return None
    shift = keys_hi - rows_hi  # the kernel aligns the block's last row on its last key; the rule does not
    block_window = (UNBOUNDED if left == UNBOUNDED else left + shift,
                    UNBOUNDED if right == UNBOUNDED else right - shift)
    return Block(rows_lo - q_start, rows_hi - q_start, keys_lo - k_start, keys_hi - k_start, block_window)
