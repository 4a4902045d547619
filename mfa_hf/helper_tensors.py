"""The tensors around q/k/v, normalised once, in validation, to what every kernel binds.

The rule: the tensor bound to a kernel is the tensor whose strides are passed. A backend that
copied a helper tensor (`.contiguous()`, `.to(float32)`) but passed the caller's strides read the
copy wrongly, or past its end. So the entry points hand every backend helper tensors already in the
dtype and layout the kernels read, at most one copy each (none when the caller's tensor fits):

- index vectors (cu_seqlens, cache_seqlens, cache_batch_idx): contiguous int32;
- per-head floats (alibi_slopes, sinks): contiguous float32 (float64 for float64 inputs, which only
  the torch backend serves); sinks stay differentiable through the conversion;
- masks keep their view (a broadcast mask must not be materialised; backends read the strides of the
  tensor they bind): bool stays bool, an additive mask becomes float32 unless it is float16,
  bfloat16 or float32 already (float64 stays for float64 inputs), and its rank becomes 4.
"""

from __future__ import annotations

import torch

from .kernels.launch import lse_dtype

INT32_MAX = 2**31 - 1
MASK_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def index_vector(t: torch.Tensor | None, name: str, largest: int | None = None) -> torch.Tensor | None:
    """Contiguous int32. largest: the biggest value it may hold (known on the host), checked to fit."""
    if t is None:
        return None
    if largest is not None and largest > INT32_MAX:
        raise ValueError(f"{name}: expected values below 2**31 (the kernels index with int32), got up to {largest}")
    return t.to(torch.int32).contiguous()


def per_head_floats(t: torch.Tensor | None, input_dtype: torch.dtype) -> torch.Tensor | None:
    if t is None:
        return None
    return t.to(lse_dtype(input_dtype)).contiguous()


def attention_mask(mask: torch.Tensor | None, input_dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype != torch.bool and mask.dtype not in MASK_FLOAT_DTYPES:
        mask = mask.to(lse_dtype(input_dtype))  # float64: kept for float64 inputs only
    if mask.dim() < 4:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # a view: leading ones
    return mask
