"""Quantize-on-write append kernel (kvcache_append.metal): new tokens into a plain or quantized
cache in place, bit-exact with mfa_hf.quant.encode and its per-token absmax scales.

`append(cache, new, cache_seqlens, cache_batch_idx)` writes new (B, Lnew, Hkv, D) at positions
cache_seqlens[b] .. + Lnew - 1 of cache row cache_batch_idx[b] (or b). `append_call` is the same on
an AppendCall (kernels/contract.py): the metal backend's append, which `mfa_hf.flash_attn_with_kvcache`
uses whenever the metal backend serves the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mfa_hf import kv_formats
from mfa_hf.quant import QuantizedKV, scales_per_token

from ..contract import AppendCall
from .binding import FORMAT_CODES, code_type, index_vector, placeholder, strides4
from .loader import MSL_TYPES, library

APPEND_PARAM_COUNT = 15


@dataclass(frozen=True)
class AppendVariant:
    SOURCE: ClassVar[str] = "kvcache_append.metal"
    dtype: torch.dtype
    format: str
    dim: int
    per_token: bool
    batch_idx: bool

    def defines(self, param_count: int) -> dict:
        return {"IN_T": MSL_TYPES[self.dtype], "FMT": FORMAT_CODES[self.format],
                "CODE_T": code_type(self.format, self.dtype), "CODE_MAX": f"{kv_formats.spec(self.format).code_max!r}f",
                "D": self.dim, "PER_TOKEN": self.per_token,
                "HAS_BATCH_IDX": self.batch_idx, "APPEND_PARAM_COUNT": param_count}


def append(cache, new: torch.Tensor, cache_seqlens: torch.Tensor, cache_batch_idx: torch.Tensor | None = None):
    if new.numel() == 0:  # no token, sequence or head: nothing to write (a Metal grid has no empty dimension)
        return
    quantized = isinstance(cache, QuantizedKV)
    codes = cache.codes if quantized else cache
    scales = cache.scales if quantized else None
    fmt = cache.format.value if quantized else "none"
    if not quantized and codes.dtype != new.dtype:
        raise TypeError(f"new: expected dtype {codes.dtype} like the cache, got {new.dtype}")
    per_token = quantized and scales_per_token(codes, scales)
    batch, count, heads, dim = new.shape
    variant = AppendVariant(new.dtype, fmt, dim, per_token, cache_batch_idx is not None)
    group = cache.group_size if quantized else dim
    params = strides4(new) + strides4(codes) + strides4(scales) + [group, codes.shape[1], codes.shape[0]]
    lib = library(variant, new.device, APPEND_PARAM_COUNT)
    lib.kvcache_append(new, codes, placeholder(new.device, torch.float32) if scales is None else scales,
                       index_vector(cache_seqlens, new.device), index_vector(cache_batch_idx, new.device), params,
                       threads=(32 * count, heads, batch), group_size=(32, 1, 1))


def append_call(call: AppendCall) -> None:
    """append() on a cache given as its parts (the custom op's schema: no QuantizedKV crosses it)."""
    side = call.cache
    cache = side.codes if side.format == "none" else QuantizedKV(side.codes, side.scales, side.format,
                                                                 side.group_size, call.new.dtype)
    append(cache, call.new, call.cache_seqlens, call.cache_batch_idx)
