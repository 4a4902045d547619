"""mps-flash-attn's public surface with ITS meanings, served by mfa-hf: change one import.

    import mps_flash_attn                     ->  from mfa_hf import mps_flash_attn
    from mps_flash_attn import flash_attention ->  from mfa_hf.mps_flash_attn import flash_attention

Every name here takes mps-flash-attn's arguments in its order (mpsops/mps-flash-attention bdd5e4d,
mps_flash_attn/__init__.py) and keeps its meanings where they differ from mfa_hf's own functions:
- bool / uint8 attn_mask: True / non-zero = masked out (mfa_hf.flash_attention: True = attend);
- window_size w: query i sees keys i - w .. i (w + 1 keys; 0 = full attention);
- causal and window with Lq != Lk align top-left (row i sees keys <= i), as its Metal kernel does
  (mfa_hf: bottom-right); for Lq == Lk the two agree and our kernels' own flags serve the call;
- scale is the 5th positional argument of flash_attention; scale <= 0 is refused, as there;
- attn_mask may be 2-D (N_q, N_kv) or 3-D (B, N_q, N_kv), promoted to 4-D, as 0.6.3 does (0.5 took 4-D only).
The work is mfa_hf.flash_attention's (any device, forward and backward); nothing is reimplemented.
docs/migrating.md maps each name. Names that need no change of meaning are re-exported as they are.
"""

from __future__ import annotations

import torch

from .api import flash_attention as _ours
from .api import flash_attention_chunked as _ours_chunked
from .custom_op_alias import mps_mask, mps_window, register_custom_op
from .mps_bias import flash_attention_with_bias
from .mps_kernels import clear_cache, is_available, precompile
from .mps_quantized import (QUANT_FP8_E4M3, QUANT_FP8_E5M2, QUANT_INT8, QUANT_NF4, flash_attention_fp8,
                            flash_attention_int8, flash_attention_nf4, flash_attention_quantized, quantize_kv_fp8,
                            quantize_kv_int8, quantize_kv_nf4)
from .mps_visibility import check_scale, visibility

__version__ = "0.5.1"  # the mps-flash-attn release whose surface this module reproduces


def flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool = False,
                    scale: float | None = None, attn_mask: torch.Tensor | None = None, window_size: int = 0,
                    bf16_backward: bool = False) -> torch.Tensor:
    """mps-flash-attn's flash_attention: (B, H, S, D); mask True = masked out; window w = w + 1 keys."""
    check_scale(scale, query.shape[-1] if isinstance(query, torch.Tensor) and query.dim() else None)
    key, value, is_causal, window, mask = visibility(query, key, value, is_causal, window_size, mps_mask(attn_mask))
    return _ours(query, key, value, is_causal=is_causal, attn_mask=mask, window_size=window, scale=scale,
                 bf16_backward=bf16_backward)


def flash_attention_chunked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, chunk_size: int = 16384,
                            is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """mps-flash-attn's flash_attention_chunked: (B, H, S, D), its argument order, causal aligned top-left. Served
    by mfa_hf.flash_attention_chunked (query chunks, each with only the keys it can see; backward works)."""
    check_scale(scale, query.shape[-1] if isinstance(query, torch.Tensor) and query.dim() else None)
    key, value, is_causal, window, _ = visibility(query, key, value, is_causal, None, None)  # no mask without one
    return _ours_chunked(query, key, value, chunk_size=chunk_size, is_causal=is_causal, window_size=window,
                         scale=scale)


def convert_mask(attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """mps-flash-attn's convert_mask: None stays None, a bool mask is returned as it is, a float (additive)
    mask becomes `attn_mask <= -1e3` (True = masked out, the convention of this module's functions).

    Its output is NOT a mask for mfa_hf.flash_attention (True = attend there); that function takes the
    float mask itself, added exactly."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask: expected a tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype == torch.bool:
        return attn_mask
    if not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask: expected a bool or float mask, got {attn_mask.dtype}")
    return attn_mask <= -1e3


def __getattr__(name: str):
    if name == "benchmark":  # `from mfa_hf.mps_flash_attn import benchmark`, as mps_flash_attn.benchmark
        import importlib

        return importlib.import_module("mfa_hf.benchmark")
    if name == "replace_sdpa":
        from .integrations.sdpa_patch import replace_sdpa

        return replace_sdpa
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["flash_attention", "flash_attention_with_bias", "flash_attention_chunked", "flash_attention_fp8",
           "flash_attention_int8", "flash_attention_nf4", "quantize_kv_fp8", "quantize_kv_int8", "quantize_kv_nf4",
           "replace_sdpa", "precompile", "clear_cache", "register_custom_op", "is_available", "convert_mask",
           "QUANT_FP8_E4M3", "QUANT_FP8_E5M2", "QUANT_INT8", "QUANT_NF4", "flash_attention_quantized", "__version__"]
