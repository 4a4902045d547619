"""mps-flash-attn's causal / window / scale arguments turned into mfa_hf.flash_attention's.

Its Metal kernel masks key j from query i when j > i (causal) or j < i - window_size: aligned top-left,
whatever Lq and Lk. mfa_hf aligns bottom-right (FlashAttention-2). For Lq == Lk the two agree, and the
call keeps our flags (the kernels skip masked blocks); for Lq != Lk other flags see the same keys, after cutting
the keys no row sees (sdpa_semantics.translate, SDPA's is_causal being top-left too). Only a window that leaves
some rows with no key needs a bool mask.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import torch

from .custom_op_alias import mps_window
from . import scalars
from .problem import NO_WINDOW, InputError
from .sdpa_semantics import translate


def check_scale(scale, head_dim: int | None = None) -> None:
    """mps-flash-attn refuses scale <= 0 (ValueError, "scale must be positive") and warns where scale is over
    100x from 1/sqrt(D) either way (UserWarning, its wording); None is 1/sqrt(D)."""
    if scale is None:
        return
    if not isinstance(scale, torch.SymFloat):  # a real number of any kind (numpy's too); a tensor or bool is not
        scale = scalars.real_number(scale, "scale", "a positive finite number or None (1/sqrt(head_dim))")
    if not scalars.is_finite(scale) or scale <= 0:
        raise ValueError(f"scale must be positive: expected a positive finite number or None (1/sqrt(head_dim)), "
                         f"got {scale!r}")
    if head_dim:
        default = 1.0 / math.sqrt(head_dim)
        if not default * 0.01 <= scale <= default * 100:
            warnings.warn(f"scale={scale:.6g} is very different from default {default:.6g} (1/sqrt(head_dim)), "
                          "this may cause numerical issues", UserWarning, stacklevel=3)


def _mask_4d(mask, batch: int, lq: int, lk: int):
    """mps-flash-attn 0.6.3's mask shapes: 4-D whose query and key dims are Lq or 1 and Lk or 1, or 2-D (N_q, N_kv)
    and 3-D (B, N_q, N_kv) promoted to 4-D (its 0.6 change; 0.5 took 4-D only); its ValueErrors otherwise."""
    if mask is None:
        return None
    if mask.dim() == 3 and mask.shape[0] not in (1, batch):  # named as passed: the promoted shape was never given
        raise ValueError(f"attn_mask batch size must be 1 or {batch}: a 3-D mask is read as (B, N_q, N_kv), got "
                         f"shape {tuple(mask.shape)} (a per-head mask is 4-D: (B, H, N_q, N_kv))")
    if mask.dim() in (2, 3):
        mask = mask[None, None] if mask.dim() == 2 else mask[:, None]
    if mask.dim() != 4:
        raise ValueError(f"attn_mask must be 2D/3D/4D ((N_q, N_kv), (B, N_q, N_kv) or (B, H, N_q, N_kv)), got "
                         f"{mask.dim()}D: shape {tuple(mask.shape)}")
    if mask.shape[2] not in (1, lq) or mask.shape[3] not in (1, lk):
        raise ValueError(f"attn_mask shape mismatch: expected (B or 1, H or 1, {lq} or 1, {lk} or 1), "
                         f"got {tuple(mask.shape)}")
    return mask


def _checked_causal(query, key, is_causal) -> bool:
    if not scalars.is_bool(is_causal):  # numpy's bool too; 0/1 stay refused
        raise TypeError(f"is_causal: expected a bool, got {type(is_causal).__module__}.{type(is_causal).__name__} "
                        f"{is_causal!r}")
    for name, t in (("query", query), ("key", key)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"{t.dim()}-D" if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"{name} must be 4D: expected a 4-D tensor (B, H, S, D), got {got}")  # a RuntimeError there
    return bool(is_causal)


def visibility(query, key, value, is_causal: bool, window_size, keep: torch.Tensor | None):
    """(key, value, is_causal, window_size, attn_mask) for mfa_hf.flash_attention with mps-flash-attn's meaning
    of is_causal and window_size, top-left as SDPA's is_causal (sdpa_semantics.translate): keys no row sees are
    cut from key, value and the caller's mask `keep` (our polarity, True = attend), so 100K+ inputs need no
    (Lq, Lk) mask; a caller's other per-key tensors take the same cut (mask_keys, Translation.keys). Only a window
    that leaves rows past Lk + w with no key takes a bool mask of the visible keys. A value of another length
    than the key is never cut around: the call then fails on the shapes as passed."""
    is_causal = _checked_causal(query, key, is_causal)
    window = mps_window(window_size, is_causal)
    lq, lk = query.shape[2], key.shape[2]
    keep = _mask_4d(keep, query.shape[0], lq, lk)
    flags = translate(lq, lk, is_causal, None if window is None else window[0])
    if flags is not None:
        if not (isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[2] == lk):
            flags = replace(flags, keys=None)
        key, value = flags.keep_keys(key, value, 2)
        window = None if flags.window == NO_WINDOW else flags.window
        return key, value, flags.causal, window, flags.keep_mask(keep)
    rows = torch.arange(lq, device=query.device)[:, None]
    cols = torch.arange(lk, device=query.device)[None, :]
    visible = (cols >= rows - window[0]) & (cols <= rows if is_causal else True)
    return key, value, False, None, visible if keep is None else keep & visible
