"""Launching the Metal forward kernel: parameters, strides, grid. No host synchronization here:
everything passed is known on the host (shapes, strides, Python scalars) or is a device tensor."""

from __future__ import annotations

import math

import torch

from ..contract import AttentionCall
from ..launch import empty_result, new_output

from .loader import MSL_TYPES, ForwardVariant, header_fields, library

LOG2E = 1.4426950408889634
# The order of AttentionParams in attention_params.h; checked against the header at import.
PARAM_FIELDS = (
    "q_stride_b", "q_stride_s", "q_stride_h", "q_stride_d",
    "k_stride_b", "k_stride_s", "k_stride_h", "k_stride_d",
    "v_stride_b", "v_stride_s", "v_stride_h", "v_stride_d",
    "o_stride_b", "o_stride_s", "o_stride_h", "o_stride_d",
    "lse_stride_b", "lse_stride_h", "lse_stride_s",
    "mask_stride_b", "mask_stride_h", "mask_stride_q", "mask_stride_k",
    "alibi_stride_b",
    "seqlen_q", "seqlen_k", "group", "window_left", "window_right", "total_q", "total_k",
)
_declared = header_fields("attention_params.h", "AttentionParams")
if _declared != PARAM_FIELDS:
    raise ImportError(f"attention_params.h: expected AttentionParams fields {PARAM_FIELDS}, got {_declared}")


def _bshd_strides(t: torch.Tensor) -> list[int]:
    """(batch, sequence, head, dim) element strides; packed (T, H, D) tensors get batch stride 0."""
    if t.dim() == 3:
        return [0, *t.stride()]
    return list(t.stride())


def _lse_strides(lse: torch.Tensor) -> list[int]:
    """(batch, head, sequence) strides of the LSE: (B, Hq, Lq), or (Hq, Tq) when packed."""
    if lse.dim() == 2:
        return [0, lse.stride(0), lse.stride(1)]
    return list(lse.stride())




_placeholders: dict = {}


def _placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element buffer bound where a feature is off (the kernel never reads it); allocated
    once per device and dtype, not per call."""
    key = (device, dtype)
    if key not in _placeholders:
        _placeholders[key] = torch.zeros(1, dtype=dtype, device=device)
    return _placeholders[key]


def _kernel_mask(attn_mask: torch.Tensor) -> torch.Tensor:
    """The mask as the kernel reads it: bool as bytes (a view), additive in half/bfloat/float."""
    if attn_mask.dtype == torch.bool:
        return attn_mask.view(torch.uint8)
    if attn_mask.dtype in MSL_TYPES:
        return attn_mask
    return attn_mask.to(torch.float32)  # float64 masks: rare, so a copy is acceptable


# The strides passed for a helper tensor are always read from the tensor bound (a copy has its own).
def bound_mask(attn_mask, device, batch: int, heads: int, lq: int, lk: int) -> tuple[torch.Tensor, list[int]]:
    """The mask buffer the kernel binds and its (b, h, q, k) element strides."""
    if attn_mask is None:
        return _placeholder(device, torch.uint8), [0, 0, 0, 0]
    mask = _kernel_mask(attn_mask)
    return mask, list(mask.expand(batch, heads, lq, lk).stride())


def bound_slopes(alibi_slopes, device) -> tuple[torch.Tensor, int]:
    """The float32 slopes the kernel binds ((Hq,) or (B, Hq), heads contiguous) and their batch stride."""
    if alibi_slopes is None:
        return _placeholder(device, torch.float32), 0
    slopes = alibi_slopes.to(torch.float32).contiguous()
    return slopes, 0 if slopes.dim() == 1 else slopes.stride(0)


def bound_floats(t, device) -> torch.Tensor:
    """A contiguous float32 vector the kernel binds (sinks), or the placeholder."""
    return _placeholder(device, torch.float32) if t is None else t.to(torch.float32).contiguous()


def forward(call: AttentionCall):
    q, k, v, attn_mask, alibi_slopes, sinks = call.q, call.k, call.v, call.attn_mask, call.alibi_slopes, call.sinks
    cu_seqlens_q, cu_seqlens_k, o = call.cu_seqlens_q, call.cu_seqlens_k, call.options
    if o.dropout_p > 0:
        raise ValueError(f"dropout_p: the metal forward has no dropout (the torch backend serves it), got {o.dropout_p}")
    if call.empty:  # a Metal grid has no empty dimension
        return empty_result(q, v, sinks)
    varlen, batch, lq, lk = call.varlen, call.batch, call.seqlen_q, call.seqlen_k
    heads_q, heads_kv = call.heads_q, call.heads_kv
    scale, softcap = o.scale, o.softcap

    out = new_output(q.shape[:-1] + (v.shape[-1],), q.dtype, q.device)
    lse_shape = (heads_q, q.shape[0]) if varlen else (batch, heads_q, lq)
    lse = new_output(lse_shape, torch.float32, q.device)

    mask, mask_strides = bound_mask(attn_mask, q.device, batch, heads_q, lq, lk)
    slopes, slopes_stride = bound_slopes(alibi_slopes, q.device)
    variant = ForwardVariant(
        dtype=q.dtype, dim_qk=q.shape[-1], dim_v=v.shape[-1],
        mask_kind="none" if attn_mask is None else ("bool" if attn_mask.dtype == torch.bool else "additive"),
        mask_dtype=None if attn_mask is None or attn_mask.dtype == torch.bool else mask.dtype,
        softcap=softcap > 0, alibi=alibi_slopes is not None, sinks=sinks is not None, varlen=varlen,
        cu_seqlens_dtype=cu_seqlens_q.dtype if varlen else torch.int32)
    config = variant.config()

    params = (_bshd_strides(q) + _bshd_strides(k) + _bshd_strides(v) + _bshd_strides(out) + _lse_strides(lse)
              + mask_strides + [slopes_stride] + [lq, lk, heads_q // heads_kv, o.window_left, o.window_right]
              + [q.shape[0], k.shape[0]])
    unit = 1.0 if variant.mask_kind == "additive" else LOG2E  # attention_forward.metal's SCORE_UNIT
    q_scale = scale / softcap if softcap > 0 else scale * unit
    cap_scale = softcap * unit

    sink_logits = bound_floats(sinks, q.device)
    cu_q = cu_seqlens_q if varlen else _placeholder(q.device, torch.int32)
    cu_k = cu_seqlens_k if varlen else _placeholder(q.device, torch.int32)

    lib = library(variant, q.device, len(PARAM_FIELDS))
    groups = math.ceil(lq / config.query_block)
    lib.attention_forward(
        q, k, v, out, lse, params, float(q_scale), float(cap_scale), mask, slopes, sink_logits, cu_q, cu_k,
        threads=(config.threads * groups, heads_q, batch), group_size=(config.threads, 1, 1))
    return out, lse
