"""The quantized-KV names of the `mps-flash-attn` package, on (B, H, S, D) tensors.

    codes, scale = quantize_kv_fp8(k)                      # per (token, head) scale (B, H, S, 1)
    out = flash_attention_fp8(q, k_codes, v_codes, k_scale, v_scale, is_causal=True)

Unlike that package's "FP8" (linear uint8 with a zero point), the codes here are real float8 bytes
(e4m3 by default, e5m2 with fp8_format="e5m2"). Each quantize function returns (codes, scales);
the matching attention takes both sides' codes and scales and the usual flash_attention options.
"""

from __future__ import annotations

import torch

from . import kv_formats
from .api import flash_attention
from .problem import fits_dim
from .quant import QuantizedKV, quantize_kv


def _fp8_format(fp8_format: str) -> str:
    described = kv_formats.by_alias(fp8_format) if isinstance(fp8_format, str) else None
    if described is None or described.float8_dtype is None:
        names = " or ".join(repr(a) for f in kv_formats.QUANTIZED if f.float8_dtype is not None for a in f.aliases)
        raise ValueError(f"fp8_format: expected {names}, got {fp8_format!r}")
    return described.name


def quantize_kv_fp8(x: torch.Tensor, fp8_format: str = "e4m3") -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, S, D) -> (codes uint8 (B, H, S, D) float8 bytes, scale float32 (B, H, S, 1))."""
    packed = quantize_kv(x, _fp8_format(fp8_format), layout="bhsd")
    return packed.codes, packed.scales


def quantize_kv_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, S, D) -> (codes int8 (B, H, S, D), scale float32 (B, H, S, 1)), symmetric."""
    packed = quantize_kv(x, "int8", layout="bhsd")
    return packed.codes, packed.scales


def quantize_kv_nf4(x: torch.Tensor, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, S, D) -> (codes uint8 (B, H, S, D // 2), scales float32 (B, H, S, D // group_size))."""
    packed = quantize_kv(x, "nf4", group_size=group_size, layout="bhsd")
    return packed.codes, packed.scales


def flash_attention_fp8(q, k_codes, v_codes, k_scale, v_scale, is_causal: bool = False, fp8_format: str = "e4m3",
                        **options):
    """flash_attention (B, H, S, D) over float8 K/V codes from quantize_kv_fp8."""
    fmt = _fp8_format(fp8_format)
    return attend_codes(q, k_codes, v_codes, k_scale, v_scale, fmt, None, is_causal, options)


def flash_attention_int8(q, k_codes, v_codes, k_scale, v_scale, is_causal: bool = False, **options):
    """flash_attention (B, H, S, D) over int8 K/V codes from quantize_kv_int8."""
    return attend_codes(q, k_codes, v_codes, k_scale, v_scale, "int8", None, is_causal, options)


def flash_attention_nf4(q, k_codes, v_codes, k_scale, v_scale, is_causal: bool = False,
                        group_size: int | None = None, **options):
    """flash_attention (B, H, S, D) over nf4 K/V codes; group_size defaults to D // scales.shape[-1]."""
    return attend_codes(q, k_codes, v_codes, k_scale, v_scale, "nf4", group_size, is_causal, options)


def attend_codes(q, k_codes, v_codes, k_scale, v_scale, fmt, group_size, is_causal, options):
    if not isinstance(q, torch.Tensor) or not q.is_floating_point():
        raise TypeError(f"q: expected a float tensor (B, H, Lq, D), got "
                        f"{q.dtype if isinstance(q, torch.Tensor) else type(q).__name__}")
    k = _packed("k", k_codes, k_scale, fmt, group_size, q.dtype)
    v = _packed("v", v_codes, v_scale, fmt, group_size, q.dtype)
    return flash_attention(q, k, v, is_causal=is_causal, **options)


def _packed(side: str, codes, scales, fmt: str, group_size, dtype) -> QuantizedKV:
    """A (B, H, S, D) QuantizedKV from codes and scales, validated (errors name k_/v_codes, _scale)."""
    for name, t in ((f"{side}_codes", codes), (f"{side}_scale", scales)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a 4-D tensor (B, H, S, ...), got {got}")
    (b, h, s, _), (sb, sh, ss, _) = codes.shape, scales.shape
    if not fits_dim(sb, b) or sh != h or not fits_dim(ss, s):
        raise ValueError(f"{side}_scale: expected shape ({b} or 1, {h}, {s} or 1, G) to match {side}_codes "
                         f"{tuple(codes.shape)}, got {tuple(scales.shape)}")
    if group_size is None:
        dim = kv_formats.spec(fmt).logical_dim(codes.shape[-1])
        group_size = dim // scales.shape[-1] if scales.shape[-1] and dim % scales.shape[-1] == 0 else -1
    # QuantizedKV checks in (B, S, H, .) order; it reports the scales' shape as it came. Its errors name
    # QuantizedKV's fields: renamed here to this function's arguments.
    try:
        return QuantizedKV(codes.transpose(1, 2), scales.transpose(1, 2), fmt, group_size, dtype).transpose(1, 2)
    except (TypeError, ValueError) as error:
        message = str(error).replace("QuantizedKV.codes", f"{side}_codes").replace("QuantizedKV.scales", f"{side}_scale")
        raise type(error)(message.replace("QuantizedKV.group_size", "group_size")) from None
