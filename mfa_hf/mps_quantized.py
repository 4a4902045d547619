"""mps-flash-attn's quantized-KV names with its argument order and constants, on mfa-hf's formats.

    QUANT_FP8_E4M3 = 3, QUANT_FP8_E5M2 = 4, QUANT_INT8 = 5, QUANT_NF4 = 6   (its integer codes)
    k_q, v_q, k_s, v_s = quantize_kv_fp8(key, value)        # its source; quantize_kv_fp8(k) -> (k_q, k_s)
    out = flash_attention_quantized(q, k_q, v_q, k_s, v_s, QUANT_FP8_E4M3, is_causal, attn_mask, window_size)

The codes and scales are mfa-hf's (mfa_hf.quant_compat: real float8 bytes, symmetric int8, NF4 with a
scale per group), not byte-compatible with codes stored by mps-flash-attn; attention over them is
mfa_hf.flash_attention with QuantizedKV K/V. attn_mask / window_size / causal keep mps-flash-attn's
meanings (mfa_hf.mps_visibility). Quantized K/V take no attn_mask here, so a mask, and the one top-left
window that only a mask expresses (Lq > Lk + window_size), are refused with an error naming the argument.
"""

from __future__ import annotations

import torch

from . import quant_compat
from .custom_op_alias import mps_mask
from .mps_visibility import check_scale, visibility

QUANT_FP8_E4M3 = 3  # FP8, 4 exponent / 3 mantissa bits
QUANT_FP8_E5M2 = 4  # FP8, 5 exponent / 2 mantissa bits
QUANT_INT8 = 5
QUANT_NF4 = 6
FORMATS = {QUANT_FP8_E4M3: "fp8_e4m3", QUANT_FP8_E5M2: "fp8_e5m2", QUANT_INT8: "int8", QUANT_NF4: "nf4"}


def flash_attention_quantized(query, key, value, k_scale, v_scale, quant_type: int, is_causal: bool = False,
                              attn_mask=None, window_size: int = 0, scale: float | None = None):
    """Attention over K/V codes of format quant_type (QUANT_*), forward only as in mps-flash-attn."""
    fmt = FORMATS.get(quant_type) if isinstance(quant_type, int) and not isinstance(quant_type, bool) else None
    if fmt is None:
        raise ValueError(f"quant_type: expected one of {sorted(FORMATS)} (QUANT_FP8_E4M3, QUANT_FP8_E5M2, QUANT_INT8, "
                         f"QUANT_NF4), got {quant_type!r}")
    check_scale(scale, query.shape[-1] if isinstance(query, torch.Tensor) and query.dim() else None)
    flags = is_causal, window_size
    lk = key.shape[2]
    cut_key, cut_value, is_causal, window, mask = visibility(query, key, value, is_causal, window_size,
                                                             mps_mask(attn_mask))
    if attn_mask is None and mask is not None:
        raise NotImplementedError(
            f"is_causal / window_size {flags} with Lq={query.shape[2]} > Lk={lk} + window_size: mps-flash-attn aligns "
            "them top-left (rows past Lk + window_size see no key), which only a mask expresses, and quantized K/V "
            "take no mask here; pass a larger window_size, or dequantized K/V to mfa_hf.mps_flash_attn.flash_attention")
    if all(isinstance(s, torch.Tensor) and s.dim() == 4 and s.shape[2] in (1, lk) for s in (k_scale, v_scale)):
        key, value = cut_key, cut_value  # else not cut: the call fails on the scales as passed
        k_scale, v_scale = (s if s.shape[2] == 1 else s[:, :, :key.shape[2]] for s in (k_scale, v_scale))
    try:
        return quant_compat.attend_codes(query, key, value, k_scale, v_scale, fmt, None, is_causal,
                                         dict(attn_mask=mask, window_size=window, scale=scale))
    except (TypeError, ValueError) as error:  # name this function's arguments
        message = str(error).replace("k_codes", "key").replace("v_codes", "value").replace("q:", "query:", 1)
        raise type(error)(message) from None


def flash_attention_fp8(query, key, value, k_scale, v_scale, is_causal: bool = False, attn_mask=None,
                        window_size: int = 0, use_e5m2: bool = False, scale: float | None = None):
    quant_type = QUANT_FP8_E5M2 if use_e5m2 else QUANT_FP8_E4M3
    return flash_attention_quantized(query, key, value, k_scale, v_scale, quant_type, is_causal, attn_mask,
                                     window_size, scale)


def flash_attention_int8(query, key, value, k_scale, v_scale, is_causal: bool = False, attn_mask=None,
                         window_size: int = 0, scale: float | None = None):
    return flash_attention_quantized(query, key, value, k_scale, v_scale, QUANT_INT8, is_causal, attn_mask,
                                     window_size, scale)


def flash_attention_nf4(query, key, value, k_scale, v_scale, is_causal: bool = False, attn_mask=None,
                        window_size: int = 0, scale: float | None = None):
    return flash_attention_quantized(query, key, value, k_scale, v_scale, QUANT_NF4, is_causal, attn_mask,
                                     window_size, scale)


def quantize_kv_fp8(key, value=None, use_e5m2: bool = False):
    """(key, value) -> (k_q, v_q, k_s, v_s) as its source; (key) alone -> (k_q, k_s) as its README."""
    return _both(lambda x: quant_compat.quantize_kv_fp8(x, "e5m2" if use_e5m2 else "e4m3"), key, value)


def quantize_kv_int8(key, value=None):
    return _both(quant_compat.quantize_kv_int8, key, value)


def quantize_kv_nf4(key, value=None):
    """Scales per group of 64 along D (32 when D is not a multiple of 64; mps-flash-attn: one per head)."""
    return _both(lambda x: quant_compat.quantize_kv_nf4(x, 64 if x.shape[-1] % 64 == 0 else 32), key, value)


def _both(quantize, key, value):
    k_q, k_s = quantize(key)
    if value is None:
        return k_q, k_s
    v_q, v_s = quantize(value)
    return k_q, v_q, k_s, v_s
