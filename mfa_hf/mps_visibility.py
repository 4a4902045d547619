"""mps-flash-attn's causal / window / scale arguments turned into mfa_hf.flash_attention's.

Its Metal kernel masks key j from query i when j > i (causal) or j < i - window_size: aligned top-left,
whatever Lq and Lk. mfa_hf aligns bottom-right (FlashAttention-2). For Lq == Lk the two agree, and the
call keeps our flags (the kernels skip masked blocks); for Lq != Lk the visible keys become a bool mask.
"""

from __future__ import annotations

import math

import torch

from .custom_op_alias import mps_window


def check_scale(scale) -> None:
    """mps-flash-attn refuses scale <= 0 (ValueError); None is 1/sqrt(D)."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite number or None (1/sqrt(head_dim)), got {scale!r}")


def visibility(query, key, is_causal: bool, window_size, keep: torch.Tensor | None):
    """(is_causal, window_size, attn_mask) for mfa_hf.flash_attention with mps-flash-attn's meaning of
    is_causal and window_size. keep: the caller's mask in our polarity (True = attend) or None."""
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal: expected a bool, got {type(is_causal).__name__}")
    for name, t in (("query", query), ("key", key)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"{t.dim()}-D" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a 4-D tensor (B, H, S, D), got {got}")
    window = mps_window(window_size, is_causal)
    lq, lk = query.shape[2], key.shape[2]
    if lq == lk or (not is_causal and window is None):
        return is_causal, window, keep
    rows = torch.arange(lq, device=query.device)[:, None]
    cols = torch.arange(lk, device=query.device)[None, :]
    visible = cols <= rows if is_causal else torch.ones(lq, lk, dtype=torch.bool, device=query.device)
    if window is not None:
        visible = visible & (cols >= rows - window[0])
    return False, None, visible if keep is None else keep & visible
