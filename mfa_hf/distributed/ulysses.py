"""Ulysses (all-to-all) attention: trade the sequence split for a head split, attend, trade back.

Each rank holds n = N/P tokens of every head. One all-to-all gives it all N tokens of H/P query heads
(and Hkv/P KV heads: GQA stays grouped, nothing is repeated); it then runs one ordinary attention
call (flash_attn_func, with every feature: causal, window, softcap, sinks of its heads) and a second
all-to-all returns its n tokens of every head. Autograd flows through both exchanges (each one's
backward is the other) and through flash_attn_func's own backward.
"""

from __future__ import annotations

from typing import Callable

import torch

from .comm import Group, all_to_all


def ulysses_attention(group: Group, q, k, v, sinks, attend: Callable, return_lse: bool):
    """q, k, v (B, n, H, D) shards -> this rank's out (B, n, Hq, Dv) [, lse (B, Hq, n)], where
    attend(q, k, v, sinks) runs one local call over all tokens of this rank's heads (and its sinks)
    and returns (out, lse (B, Hq/P, N))."""
    heads = q.shape[2] // group.size
    local_sinks = None if sinks is None else sinks[group.rank * heads:(group.rank + 1) * heads]
    out, lse = attend(sequence_to_heads(group, q), sequence_to_heads(group, k), sequence_to_heads(group, v),
                      local_sinks)
    out = heads_to_sequence(group, out)
    if not return_lse:
        return out
    lse = heads_to_sequence(group, lse.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
    return out, lse


def sequence_to_heads(group: Group, x: torch.Tensor) -> torch.Tensor:
    """(B, n, H, D) -> (B, P*n, H/P, D): all tokens of this rank's heads."""
    return _Exchange.apply(x, group, _scatter_heads, _gather_heads)


def heads_to_sequence(group: Group, x: torch.Tensor) -> torch.Tensor:
    """(B, P*n, H/P, D) -> (B, n, H, D): this rank's tokens of every head."""
    return _Exchange.apply(x, group, _gather_heads, _scatter_heads)


def _scatter_heads(group: Group, x: torch.Tensor) -> torch.Tensor:
    batch, n, heads, dim = x.shape
    p = group.size
    parts = x.reshape(batch, n, p, heads // p, dim).permute(2, 0, 1, 3, 4)  # (P, B, n, H/P, D)
    received = all_to_all(group, parts)  # slice p: rank p's tokens of my heads
    return received.permute(1, 0, 2, 3, 4).reshape(batch, p * n, heads // p, dim)


def _gather_heads(group: Group, x: torch.Tensor) -> torch.Tensor:
    batch, total, heads, dim = x.shape
    p = group.size
    parts = x.reshape(batch, p, total // p, heads, dim).permute(1, 0, 2, 3, 4)  # (P, B, n, H/P, D)
    received = all_to_all(group, parts)  # slice p: my tokens of rank p's heads
    return received.permute(1, 2, 0, 3, 4).reshape(batch, total // p, p * heads, dim)


class _Exchange(torch.autograd.Function):
    """One all-to-all (`there`) whose backward is the inverse one (`back`)."""

    @staticmethod
    def forward(ctx, x, group, there, back):
        ctx.group, ctx.back = group, back
        return there(group, x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.back(ctx.group, grad), None, None, None


def check_heads(q: torch.Tensor, k: torch.Tensor, group: Group) -> None:
    """Ulysses splits heads: both head counts must divide by the group size."""
    for name, t in (("q", q), ("k", k)):
        if t.shape[2] % group.size:
            raise ValueError(f"{name}: expected a head count divisible by the group size {group.size} (Ulysses "
                             f"splits heads across ranks; use ring_flash_attn_func otherwise), got {t.shape[2]}")
