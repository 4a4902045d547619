"""Counter-based dropout: one keep/drop decision per (seed, batch*head, query, key), same in every backend.

A kernel that tiles the score matrix cannot replay torch's RNG stream, so dropout is defined by a
stateless hash of the element's coordinates. The reference, the torch backend, and the Triton and
Metal kernels all evaluate the same 32-bit integer function, so the same seed drops the same
elements everywhere and the backward pass can regenerate the forward's mask block by block.

The hash is a two-round xorshift-multiply mixer. Multipliers are odd and below 2**31, so the
products of 32-bit values fit in int64 and torch ops (which lack uint32 arithmetic) give the
same low 32 bits as the wrapping uint32 arithmetic of Triton and Metal.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MUL_A = 0x7FEB352D
MUL_B = 0x46CA68B5
ROW_SALT = 0x2545F491
COL_SALT = 0x1B873593
HEAD_SALT = 0x27D4EB2F
KEEP_BITS = 24  # the top 24 bits of the hash form the uniform draw


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit mixer on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * MUL_A) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL_B) & MASK32
    return x ^ (x >> 16)


def drop_threshold(p: float) -> int:
    """An element is kept when its 24-bit draw is >= this integer."""
    return int(round(p * (1 << KEEP_BITS)))


def keep_mask(
    seed: torch.Tensor, batch_head: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, p: float
) -> torch.Tensor:
    """Boolean keep mask broadcast over (batch_head, rows, cols).

    seed: int64 scalar tensor in [0, 2**32). batch_head: int64 ids b * H_q + h, shaped to broadcast
    against rows[..., :, None] and cols[..., None, :]. rows/cols: global query/key positions.
    """
    head_hash = mix32((seed ^ ((batch_head * HEAD_SALT) & MASK32)) & MASK32)
    row_hash = mix32(head_hash ^ ((rows[..., :, None] * ROW_SALT) & MASK32))
    draw = mix32(row_hash ^ ((cols[..., None, :] * COL_SALT) & MASK32)) >> (32 - KEEP_BITS)
    return draw >= drop_threshold(p)


def new_seed(generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw a seed from a torch generator (the default CPU generator when None)."""
    return torch.randint(0, 1 << 32, (), dtype=torch.int64, generator=generator)
