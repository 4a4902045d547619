"""Launching the Metal forward kernel (attention_forward.metal): its variant (the library cache key),
parameters, strides, grid. No host synchronization here: everything passed is known on the host
(shapes, strides, Python scalars) or is a device tensor."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from ..contract import AttentionCall
from ..launch import empty_result, new_output

from .binding import LOG2E, bound_floats, bound_mask, bound_slopes, placeholder, vector_row_bits
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


# The kernel keeps sequence positions (rows, keys, lengths, window bounds) in 32-bit `int` below
# this, and sums of three of them stay below 2^31; the mask's key stride times a key block (<= 32,
# so 64 with room) must fit 32 bits too. Otherwise the variant with MFA_LONG_POSITIONS (the same
# code on `long`) serves the call.
POSITION_LIMIT = 2**29
MASK_KEY_STRIDE_LIMIT = 2**31 // 64


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
    long_positions: bool = False  # the kernel's general path: positions on `long` (see POSITION_LIMIT)

    def config(self) -> BlockConfig:
        return block_config(self.dtype, self.dim_qk, self.dim_v)

    @cached_property
    def launch_constants(self) -> tuple[int, int, float]:
        """(query rows per threadgroup, threads per threadgroup, attention_forward.metal's SCORE_UNIT),
        computed once per variant (the launcher reads them on every call)."""
        config = self.config()
        return config.query_block, config.threads, 1.0 if self.mask_kind == "additive" else LOG2E

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
            "VARLEN": self.varlen, "LONG_POSITIONS": self.long_positions, "ATTENTION_PARAM_COUNT": param_count,
        }


def forward(call: AttentionCall):
    """(out, lse) (kernels/contract.py). The per-call work is kept to what the call changes: shapes,
    strides and storage offsets are read once each, the output strides follow from the shapes
    (new_output allocates contiguous), and the variant's launch constants come with its library."""
    q, k, v, attn_mask, alibi_slopes, sinks = call.q, call.k, call.v, call.attn_mask, call.alibi_slopes, call.sinks
    cu_seqlens_q, o = call.cu_seqlens_q, call.options
    if o.dropout_p > 0:
        raise ValueError(f"dropout_p: the metal forward has no dropout (the torch backend serves it), got {o.dropout_p}")
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    varlen = cu_seqlens_q is not None
    if varlen:
        batch, lq, lk = cu_seqlens_q.numel() - 1, o.max_seqlen_q, o.max_seqlen_k
    else:
        batch, lq, lk = q_shape[0], q_shape[1], k_shape[1]
    heads_q, dim_v = q_shape[-2], v_shape[-1]
    if min(batch, lq, lk, heads_q) == 0:  # a Metal grid has no empty dimension (call.empty)
        return empty_result(q, v, sinks)
    scale, softcap, device, dtype = o.scale, o.softcap, q.device, q.dtype

    rows_q = q_shape[0]  # packed: total query rows; dense: the batch
    if varlen:  # plain tuples: torch.empty takes them faster than a torch.Size built by slicing
        out = new_output((rows_q, heads_q, dim_v), dtype, device)
        lse = new_output((heads_q, rows_q), torch.float32, device)
    else:
        out = new_output((batch, lq, heads_q, dim_v), dtype, device)
        lse = new_output((batch, heads_q, lq), torch.float32, device)
    # out and lse are contiguous: (B, Lq, Hq, Dv) / (Tq, Hq, Dv) and (B, Hq, Lq) / (Hq, Tq)
    o_head = heads_q * dim_v
    if varlen:
        out_lse = (0, o_head, dim_v, 1, 0, rows_q, 1)
    else:
        out_lse = (lq * o_head, o_head, dim_v, 1, heads_q * lq, lq, 1)

    if attn_mask is None:
        mask_kind, mask_dtype = "none", None
        mask, mask_strides = placeholder(device, torch.uint8), (0, 0, 0, 0)
    else:
        mask, mask_strides = bound_mask(attn_mask, device, batch, heads_q, lq, lk)
        mask_kind, mask_dtype = ("bool", None) if attn_mask.dtype == torch.bool else ("additive", mask.dtype)
    if alibi_slopes is None:
        slopes, slopes_stride = placeholder(device, torch.float32), 0
    else:
        slopes, slopes_stride = bound_slopes(alibi_slopes, device)
    long_positions = max(lq, lk, rows_q, k_shape[0], o.window_left, o.window_right) >= POSITION_LIMIT or (
        attn_mask is not None and abs(mask_strides[3]) >= MASK_KEY_STRIDE_LIMIT)
    ingredients = (  # ForwardVariant's fields, in order
        dtype, q_shape[-1], dim_v, mask_kind, mask_dtype, softcap > 0, alibi_slopes is not None,
        sinks is not None, varlen, cu_seqlens_q.dtype if varlen else torch.int32, long_positions)
    variant, lib = launch_target(ingredients, lambda: ForwardVariant(*ingredients), device, len(PARAM_FIELDS))
    query_block, threads, unit = variant.launch_constants

    q_stride, k_stride, v_stride = q.stride(), k.stride(), v.stride()
    if varlen:  # packed (T, H, D): batch stride 0 (bshd_strides)
        q_stride, k_stride, v_stride = (0, *q_stride), (0, *k_stride), (0, *v_stride)
    params = [*q_stride, *k_stride, *v_stride, *out_lse, *mask_strides, slopes_stride,
              lq, lk, heads_q // k_shape[-2], o.window_left, o.window_right, rows_q, k_shape[0],
              vector_row_bits(q, k, v)]
    q_scale = scale / softcap if softcap > 0 else scale * unit
    cap_scale = softcap * unit

    floats = placeholder(device, torch.float32)
    sink_logits = floats if sinks is None else bound_floats(sinks, device)
    if varlen:
        cu_q, cu_k = cu_seqlens_q, call.cu_seqlens_k
    else:
        cu_q = cu_k = placeholder(device, torch.int32)

    lib.attention_forward(
        q, k, v, out, lse, params, float(q_scale), float(cap_scale), mask, slopes, sink_logits, cu_q, cu_k,
        threads=(threads * -(-lq // query_block), heads_q, batch), group_size=(threads, 1, 1))
    return out, lse
