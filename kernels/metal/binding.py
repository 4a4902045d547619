"""Argument binding shared by the Metal launchers (forward, backward, decode, append): the buffers a
kernel binds where a feature is off, the helper tensors as the kernels read them, their strides, and
the format codes of quantized caches.

The strides passed for a helper tensor are always read from the tensor bound (a copy has its own).
Nothing here reads a device value on the host.
"""

from __future__ import annotations

import torch

from mfa_hf import kv_formats

from .loader import MSL_TYPES, header_defines

LOG2E = 1.4426950408889634

FORMAT_CODES = kv_formats.kernel_ids("metal")  # what MFA_K_FMT / MFA_V_FMT / MFA_FMT take
# dequant.h names the ids for the kernels' #if / switch code; they must be the descriptors' ids.
_header_ids = {name[len("FMT_"):].lower(): value for name, value in header_defines("dequant.h", "FMT_").items()}
if _header_ids != FORMAT_CODES:
    raise ImportError(f"dequant.h: expected FMT_ constants {FORMAT_CODES} (mfa_hf/kv_formats.py), got {_header_ids}")

_placeholders: dict = {}


def placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element buffer bound where a feature is off (the kernel never reads it); allocated
    once per device and dtype, not per call."""
    key = (device, dtype)
    if key not in _placeholders:
        _placeholders[key] = torch.zeros(1, dtype=dtype, device=device)
    return _placeholders[key]


def bshd_strides(t: torch.Tensor) -> list[int]:
    """(batch, sequence, head, dim) element strides; packed (T, H, D) tensors get batch stride 0."""
    if t.dim() == 3:
        return [0, *t.stride()]
    return list(t.stride())


VECTOR_WIDTH = 4  # elements per vector load in staging.h
MAX_STAGED_ROWS = 64  # more than any block stages at once (BQ, BK <= 32)


def vector_rows(t: torch.Tensor) -> bool:
    """Whether staging.h may read `t`'s rows with 4-element vector loads and 32-bit offsets: unit
    stride along the head dim, every row start 4-element aligned (storage offset and the strides of
    the other dims, those of size 1 aside), and a block's row offsets within 32 bits. Shapes,
    strides and the storage offset only: never a device read. The storage offset is tested on
    every call; the shape/stride part is remembered per (shape, strides)."""
    if t.storage_offset() % VECTOR_WIDTH:
        return False
    key = (t.shape, t.stride())
    fits = _row_layouts.get(key)
    if fits is None:
        if len(_row_layouts) >= 4096:  # bounded: a new shape per call (growing caches) must not grow it forever
            _row_layouts.clear()
        fits = _row_layouts[key] = vector_row_layout(*key)
    return fits


_row_layouts: dict = {}


def vector_row_layout(shape, stride) -> bool:
    """vector_rows' conditions on the shape and strides (the storage offset aside)."""
    if stride[-1] != 1 and shape[-1] > 1:
        return False
    if any(s % VECTOR_WIDTH for s in stride[:-1]) and any(s % VECTOR_WIDTH for n, s in zip(shape, stride) if n > 1):
        return False
    return len(stride) < 3 or stride[-3] * MAX_STAGED_ROWS + shape[-1] < 2**31


def vector_row_bits(*tensors: torch.Tensor) -> int:
    """The kernels' `vector_rows` flags: bit n set when tensors[n] passes vector_rows."""
    bits = 0
    for n, t in enumerate(tensors):
        if vector_rows(t):
            bits |= 1 << n
    return bits


def lse_strides(lse: torch.Tensor) -> list[int]:
    """(batch, head, sequence) strides of the LSE: (B, Hq, Lq), or (Hq, Tq) when packed."""
    if lse.dim() == 2:
        return [0, lse.stride(0), lse.stride(1)]
    return list(lse.stride())


def strides4(t: torch.Tensor | None) -> list[int]:
    """Element strides of a 4-D tensor, 0 along size-1 (broadcast) dims; zeros when absent."""
    if t is None:
        return [0, 0, 0, 0]
    (n0, n1, n2, n3), (s0, s1, s2, s3) = t.shape, t.stride()
    return [0 if n0 == 1 else s0, 0 if n1 == 1 else s1, 0 if n2 == 1 else s2, 0 if n3 == 1 else s3]


def index_vector(t: torch.Tensor | None, device) -> torch.Tensor:
    """int32 on the device (a no-op when it already is; never a host read)."""
    if t is None:
        return placeholder(device, torch.int32)
    return t.to(device=device, dtype=torch.int32).contiguous()


def code_type(fmt: str, dtype: torch.dtype) -> str:
    """The MSL element type of a cache side's codes: the input type for a plain cache, else the codes' bytes."""
    code_dtype = kv_formats.spec(fmt).code_dtype
    if code_dtype is None:
        return MSL_TYPES[dtype]
    return {torch.int8: "char", torch.uint8: "uchar"}[code_dtype]


def kernel_mask(attn_mask: torch.Tensor) -> torch.Tensor:
    """The mask as the kernel reads it: bool as bytes (a view), additive in half/bfloat/float."""
    if attn_mask.dtype == torch.bool:
        return attn_mask.view(torch.uint8)
    if attn_mask.dtype in MSL_TYPES:
        return attn_mask
    return attn_mask.to(torch.float32)  # float64 masks: rare, so a copy is acceptable


def bound_mask(attn_mask, device, batch: int, heads: int, lq: int, lk: int) -> tuple[torch.Tensor, list[int]]:
    """The mask buffer the kernel binds and its (b, h, q, k) element strides."""
    if attn_mask is None:
        return placeholder(device, torch.uint8), [0, 0, 0, 0]
    mask = kernel_mask(attn_mask)
    return mask, list(mask.expand(batch, heads, lq, lk).stride())


def bound_slopes(alibi_slopes, device) -> tuple[torch.Tensor, int]:
    """The float32 slopes the kernel binds ((Hq,) or (B, Hq), heads contiguous) and their batch stride."""
    if alibi_slopes is None:
        return placeholder(device, torch.float32), 0
    slopes = alibi_slopes.to(torch.float32).contiguous()
    return slopes, 0 if slopes.dim() == 1 else slopes.stride(0)


def bound_floats(t, device) -> torch.Tensor:
    """A contiguous float32 vector the kernel binds (sinks), or the placeholder."""
    return placeholder(device, torch.float32) if t is None else t.to(torch.float32).contiguous()
