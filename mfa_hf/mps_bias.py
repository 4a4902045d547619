"""mps-flash-attn's flash_attention_with_bias: softmax((Q K^T + bias) * scale) V, on mfa_hf.flash_attention.

The bias is added BEFORE the scale there (SDPA and mfa_hf add a float mask after it), so it reaches
mfa_hf.flash_attention as the additive mask bias * scale: the same scores, exactly. bias_repeat_count
n > 0: batch b reads bias[b % n] (Swin-style windows sharing one position bias).
"""

from __future__ import annotations

import math

import torch

from .api import flash_attention
from .mps_visibility import check_scale, visibility
from .sdpa_semantics import mask_keys


def flash_attention_with_bias(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias: torch.Tensor,
                              is_causal: bool = False, scale: float | None = None, window_size: int = 0,
                              bias_repeat_count: int = 0) -> torch.Tensor:
    """(B, H, Nq, D) attention with an additive bias (B | 1, H | 1, Nq, Nkv) or (H, Nq, Nkv), added before
    the scale; is_causal / window_size as mps-flash-attn means them (mfa_hf.mps_flash_attn)."""
    check_scale(scale, query.shape[-1] if isinstance(query, torch.Tensor) and query.dim() else None)
    bias = _bias(attn_bias, query, bias_repeat_count)
    key, value, is_causal, window, keep = visibility(query, key, value, is_causal, window_size, None)
    factor = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    mask = mask_keys(bias, 0, key.shape[2]) * factor
    if keep is not None:
        mask = mask.masked_fill(~keep, -math.inf)
    return flash_attention(query, key, value, is_causal=is_causal, attn_mask=mask, window_size=window, scale=scale)


def _bias(attn_bias, query, bias_repeat_count) -> torch.Tensor:
    if not isinstance(attn_bias, torch.Tensor) or not attn_bias.is_floating_point():
        got = attn_bias.dtype if isinstance(attn_bias, torch.Tensor) else type(attn_bias).__name__
        raise TypeError(f"attn_bias: expected a float tensor (additive bias), got {got}")
    if attn_bias.dim() == 3:
        attn_bias = attn_bias.unsqueeze(0)
    if attn_bias.dim() != 4:
        raise ValueError(f"attn_bias: expected (B, H, Nq, Nkv), (1, H, Nq, Nkv) or (H, Nq, Nkv), got shape "
                         f"{tuple(attn_bias.shape)}")
    if isinstance(bias_repeat_count, bool) or not isinstance(bias_repeat_count, int) or bias_repeat_count < 0:
        raise ValueError(f"bias_repeat_count: expected an int >= 0 (0: no repeat), got {bias_repeat_count!r}")
    rows = attn_bias.shape[0]
    if bias_repeat_count == 0 or rows == 1:
        return attn_bias
    if rows < bias_repeat_count:
        raise ValueError(f"bias_repeat_count: batch b reads attn_bias[b % {bias_repeat_count}], but attn_bias has "
                         f"{rows} batch rows")
    index = torch.arange(query.shape[0], device=attn_bias.device) % bias_repeat_count
    return attn_bias.index_select(0, index)
