"""SDPA's `is_causal` in our terms: the one translation, used by every caller that keeps SDPA's meaning
(the SDPA patch, the diffusers attention function).

SDPA's is_causal aligns top-left: key j is visible from query i when j <= i, whatever Lq and Lk. Our
kernels align causal and windows bottom-right: key j is visible from query i when
    i + (Lk - Lq) - left <= j <= i + (Lk - Lq) + right      (causal: right = 0; -1 = unbounded)
so, exactly and without a mask:
- Lq == Lk: the two alignments coincide: causal.
- Lq > Lk: window (-1, Lq - Lk) (j <= i + (Lk - Lq) + (Lq - Lk) = i), not causal.
- Lq < Lk: no query sees a key beyond Lq - 1, so attend over the first Lq keys (a view of k and v along
  the sequence dim, no copy) with plain causal. Out and LSE are those of the full call; autograd through
  the view gives the unseen keys zero gradient, as SDPA does. No (Lq, Lk) mask: O(N^2) memory is what
  these callers exist to avoid.
SDPA gives is_causal together with attn_mask no single meaning (some backends combine them, others
raise), so it is not translated: `translate` raises, and a caller that can route the call elsewhere
asks `causal_with_mask` first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .problem import NO_WINDOW

CAUSAL_WITH_MASK = "is_causal: expected False when attn_mask is given (SDPA refuses both), got True"


@dataclass(frozen=True)
class Translation:
    """What our kernels are asked for so that the call means what SDPA's does.

    keys: attend over keys [0, keys) only (None: all of them); see `keep_keys`.
    causal, window: our bottom-right causal flag and (left, right) window, for the keys kept."""

    keys: int | None
    causal: bool
    window: tuple[int, int] = NO_WINDOW

    def keep_keys(self, k: torch.Tensor, v: torch.Tensor, seq_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v restricted to the keys kept: views along seq_dim (never a copy)."""
        if self.keys is None:
            return k, v
        return k.narrow(seq_dim, 0, self.keys), v.narrow(seq_dim, 0, self.keys)


def causal_with_mask(is_causal, attn_mask) -> bool:
    """Whether the call combines is_causal with attn_mask, which `translate` does not translate."""
    return bool(is_causal) and attn_mask is not None


def translate(lq: int, lk: int, is_causal, attn_mask: torch.Tensor | None = None) -> Translation:
    """SDPA's is_causal for Lq queries over Lk keys, in our terms (see the module doc). attn_mask only
    matters with is_causal: that combination raises ValueError(CAUSAL_WITH_MASK)."""
    if not is_causal:
        return Translation(keys=None, causal=False)
    if causal_with_mask(is_causal, attn_mask):
        raise ValueError(CAUSAL_WITH_MASK)
    if lq == lk:
        return Translation(keys=None, causal=True)
    if lq > lk:
        return Translation(keys=None, causal=False, window=(-1, lq - lk))
    return Translation(keys=lq, causal=True)
