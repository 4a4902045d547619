"""Launching the Metal forward kernel (attention_forward.metal): its variant (the library cache key),
parameters, strides, grid. No host synchronization here: everything passed is known on the host
(shapes, strides, Python scalars) or is a device tensor."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..contract import AttentionCall
from ..launch import empty_result, new_output

from .binding import LOG2E, bound_floats, bound_mask, bound_slopes, bshd_strides, lse_strides, placeholder, \
    vector_row_bits
from .loader import MASK_KINDS, MSL_TYPES, BlockConfig, block_config, header_fields, launch_target, round_up8

# The order of AttentionParams in attention_params.h; checked against the header at import.
PARAM_FIELDS = (
    "q_stride_b", "q_stride_s", "q_stride_h", "q_stride_d",
    "k_stride_b", "k_stride_s", "k_stride_h", "k_stride_d",
    "v_stride_b", "v_stride_s", "v_stride_h", "v_stride_d",
    "o_stride_b", "o_stride_s", "o_stride_h", "o_stride_d",
    "lse_stride_b", "lse_stride_h", "lse_stride_s",
    "mask_stride_b", "mask_stride_h", "mask_stride_q", "mask_stride_k",
    "alibi_stride_b",
    "seqlen_q", "seqlen_k", "group", "window_left", "window_right", "total_q", "total_k", "vector_rows",
)
_declared = header_fields("attention_params.h", "AttentionParams")
if _declared != PARAM_FIELDS:
    raise ImportError(f"attention_params.h: expected AttentionParams fields {PARAM_FIELDS}, got {_declared}")


@dataclass(frozen=True)
class ForwardVariant:
    """Everything that changes the forward kernel's code: the library cache key."""

    SOURCE: ClassVar[str] = "attention_forward.metal"
    dtype: torch.dtype
    dim_qk: int
    dim_v: int
    mask_kind: str = "none"
    mask_dtype: torch.dtype | None = None
    softcap: bool = False
    alibi: bool = False
    sinks: bool = False
    varlen: bool = False
    cu_seqlens_dtype: torch.dtype = torch.int32

    def config(self) -> BlockConfig:
        return block_config(self.dtype, self.dim_qk, self.dim_v)

    def defines(self, param_count: int) -> dict:
        config = self.config()
        mask_type = "uchar" if self.mask_kind != "additive" else MSL_TYPES[self.mask_dtype]
        return {
            "IN_T": MSL_TYPES[self.dtype], "MASK_T": mask_type, "MASK_KIND": MASK_KINDS[self.mask_kind],
            "CU_T": "int" if self.cu_seqlens_dtype == torch.int32 else "long",
            "DQK": self.dim_qk, "DV": self.dim_v,
            "DQK_PAD": round_up8(self.dim_qk), "DV_PAD": round_up8(self.dim_v),
            "BK": config.key_block, "WM": config.simdgroups, "Q_IN_TG": config.q_in_threadgroup,
            "K_PITCH": config.k_pitch, "V_PITCH": config.v_pitch, "Q_PITCH": config.q_pitch,
            "SHARED_KV": config.shared_kv,
            "HAS_SOFTCAP": self.softcap, "HAS_ALIBI": self.alibi, "HAS_SINKS": self.sinks,
            "VARLEN": self.varlen, "ATTENTION_PARAM_COUNT": param_count,
        }


def forward(call: AttentionCall):
    """(out, lse) (kernels/contract.py)."""
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
    ingredients = (  # ForwardVariant's fields, in order
        q.dtype, q.shape[-1], v.shape[-1],
        "none" if attn_mask is None else ("bool" if attn_mask.dtype == torch.bool else "additive"),
        None if attn_mask is None or attn_mask.dtype == torch.bool else mask.dtype,
        softcap > 0, alibi_slopes is not None, sinks is not None, varlen,
        cu_seqlens_q.dtype if varlen else torch.int32)
    variant, lib = launch_target(ingredients, lambda: ForwardVariant(*ingredients), q.device, len(PARAM_FIELDS))
    config = variant.config()

    params = (bshd_strides(q) + bshd_strides(k) + bshd_strides(v) + bshd_strides(out) + lse_strides(lse)
              + mask_strides + [slopes_stride] + [lq, lk, heads_q // heads_kv, o.window_left, o.window_right]
              + [q.shape[0], k.shape[0], vector_row_bits(q, k, v)])
    unit = 1.0 if variant.mask_kind == "additive" else LOG2E  # attention_forward.metal's SCORE_UNIT
    q_scale = scale / softcap if softcap > 0 else scale * unit
    cap_scale = softcap * unit

    sink_logits = bound_floats(sinks, q.device)
    cu_q = cu_seqlens_q if varlen else placeholder(q.device, torch.int32)
    cu_k = cu_seqlens_k if varlen else placeholder(q.device, torch.int32)

    groups = math.ceil(lq / config.query_block)
    lib.attention_forward(
        q, k, v, out, lse, params, float(q_scale), float(cap_scale), mask, slopes, sink_logits, cu_q, cu_k,
        threads=(config.threads * groups, heads_q, batch), group_size=(config.threads, 1, 1))
    return out, lse
