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
is_causal together with attn_mask: where SDPA accepts the pair (torch 2.13's CPU kernels, every dtype,
float64's math path included) it means the mask AND top-left causal, so `translate` gives the same
Translation as without the mask and `keep_mask` narrows the mask's key dimension with the keys. Some
backends raise instead; a caller that keeps stock SDPA's behaviour backend by backend (the SDPA patch)
asks `causal_with_mask` first and leaves the pair to stock.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .problem import NO_WINDOW

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

    def keep_mask(self, attn_mask: torch.Tensor | None) -> torch.Tensor | None:
        """attn_mask over the keys kept: a view along its last (key) dimension, unless that broadcasts (1)."""
        return attn_mask if self.keys is None else mask_keys(attn_mask, 0, self.keys)


def mask_keys(attn_mask: torch.Tensor | None, start: int, length: int | None = None) -> torch.Tensor | None:
    """attn_mask over the keys [start, start + length) (length None: to the end), as a view. A mask whose key
    dimension broadcasts (size 1, or a 0-d or 1-element mask) is the same over any keys, so it comes back whole."""
    if attn_mask is None or attn_mask.dim() == 0 or attn_mask.shape[-1] == 1:
        return attn_mask
    return attn_mask.narrow(-1, start, (attn_mask.shape[-1] - start) if length is None else length)


def causal_with_mask(is_causal, attn_mask) -> bool:
    """Whether the call combines is_causal with attn_mask (stock SDPA accepts that on some backends only)."""
    return bool(is_causal) and attn_mask is not None


def translate(lq: int, lk: int, is_causal, window_left: int | None = None) -> Translation | None:
    """SDPA's is_causal for Lq queries over Lk keys, in our terms (see the module doc); with a mask, apply
    `keep_mask` to it too. window_left w (mps-flash-attn's window, aligned top-left too): query i also sees no
    key j < i - w, which is the bottom-right left bound w - (Lq - Lk) over all keys; below 0 (rows past Lk + w
    see no key) no flags say it, and the result is None (never without a window)."""
    shift = lq - lk
    if is_causal and lq < lk:  # no query sees a key past Lq - 1: keep Lq keys, the lengths then agree
        return Translation(keys=lq, causal=True, window=NO_WINDOW if window_left is None else (window_left, 0))
    if window_left is None:
        if not is_causal:
            return Translation(keys=None, causal=False)
        return Translation(keys=None, causal=True) if lq == lk else Translation(None, False, (-1, shift))
    if window_left - shift < 0:
        return None
    if is_causal and lq == lk:
        return Translation(keys=None, causal=True, window=(window_left, 0))
    return Translation(keys=None, causal=False, window=(window_left - shift, shift if is_causal else -1))
