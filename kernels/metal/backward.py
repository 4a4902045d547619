"""Launching the Metal backward kernels (attention_backward.metal) for mfa_hf::metal_attention_bwd.

Three launches on the device's stream, no host synchronization: preprocess (delta), dQ, dK/dV.
dsinks (-sum exp(sink - lse) delta) and the reduction of dmask over a broadcast mask's dims are
torch ops on the device (both are small next to the kernels: (B, Hq, Lq) and the mask's size).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..contract import AttentionCall, Gradients
from ..launch import empty_grads, new_output

from .binding import bound_mask, bound_slopes, bshd_strides, lse_strides, placeholder, vector_row_bits
from .loader import MASK_KINDS, MSL_TYPES, header_fields, library

BACKWARD_PARAM_FIELDS = tuple(
    f"{name}_stride_{axis}" for name in ("q", "k", "v", "o", "do", "dq", "dk", "dv") for axis in "bshd"
) + ("lse_stride_b", "lse_stride_h", "lse_stride_s", "mask_stride_b", "mask_stride_h", "mask_stride_q",
     "mask_stride_k", "alibi_stride_b", "seqlen_q", "seqlen_k", "heads_q", "group", "window_left", "window_right",
     "total_q", "total_k", "vector_rows")
_declared = header_fields("backward_params.h", "BackwardParams")
if _declared != BACKWARD_PARAM_FIELDS:
    raise ImportError(f"backward_params.h: expected BackwardParams fields {BACKWARD_PARAM_FIELDS}, got {_declared}")

SIMDGROUPS = 4  # WM of the lane-wise kernels and the largest of the simdgroup_matrix ones
# The lane-wise kernels (MMA_MAX_DIM = 0 selects them: the baseline of emulator/backward_cost_table.py):
# rows (dQ) or keys (dK/dV) per simdgroup held in registers, R (DL + DVL) * 2 floats a lane.
ROWS_SMALL_D, ROWS_LARGE_D = 2, 1
# Both gradient kernels run on simdgroup_matrix up to this head dim (every dim the backend serves).
MMA_MAX_DIM = 256
# Up to this head dim the operands a threadgroup keeps (dQ: Q, dO; dK/dV: K, V) are fragments in registers
# (D / 4 floats a lane each, as the forward keeps Q); beyond it they are staged once in threadgroup memory
# and the streamed pair (K and V, or Q and dO) takes turns in one tile.
HELD_IN_REGISTERS_MAX_DIM = 128
THREADGROUP_MEMORY = 32 * 1024
ROW_PAD_BYTES = 16  # spreads the transposed fragment reads over banks (as the forward's tiles)
STREAM_BLOCKS = (16, 8)  # rows (keys for dQ, query rows for dK/dV) per staged block, preferred first


@dataclass(frozen=True)
class MmaBlocks:
    """One simdgroup_matrix configuration: WM simdgroups (8 WM rows or keys a threadgroup), the streamed
    block, the row pitches of the tiles (elements) and where the held operands live."""

    simdgroups: int
    stream: int
    k_pitch: int
    v_pitch: int
    held_in_tg: bool

    def threadgroup_bytes(self, size: int) -> int:
        """The threadgroup memory of the dK/dV kernel, the larger of the two (each array rounded up to 16
        bytes): the dQ kernel's tiles with the rows (keys) roles swapped, plus the LSE and delta tiles."""
        up = lambda n: -(-n // 16) * 16  # noqa: E731
        own, one = 8 * self.simdgroups, max(self.k_pitch, self.v_pitch)
        if self.held_in_tg:
            dq = up(own * self.k_pitch * size) + up(own * self.v_pitch * size) + up(self.stream * one * size)
        else:
            dq = up(self.stream * self.k_pitch * size) + up(self.stream * self.v_pitch * size)
        return dq + 2 * up(4 * self.stream)


@functools.lru_cache(maxsize=None)
def mma_blocks(dtype: torch.dtype, dim_qk: int, dim_v: int) -> MmaBlocks:
    """The first configuration that fits THREADGROUP_MEMORY, preferring more simdgroups, then the row pad,
    then a longer streamed block (the forward's order of preference)."""
    size = torch.finfo(dtype).bits // 8
    dqk_pad, dv_pad = -(-dim_qk // 8) * 8, -(-dim_v // 8) * 8
    held_in_tg = max(dim_qk, dim_v) > HELD_IN_REGISTERS_MAX_DIM
    for simdgroups in (SIMDGROUPS, 2, 1):
        for pad in (ROW_PAD_BYTES // size, 0):
            for stream in STREAM_BLOCKS:
                blocks = MmaBlocks(simdgroups, stream, dqk_pad + pad, dv_pad + pad, held_in_tg)
                if blocks.threadgroup_bytes(size) <= THREADGROUP_MEMORY:
                    return blocks
    raise ValueError(f"head dims ({dim_qk}, {dim_v}): no backward tile configuration fits {THREADGROUP_MEMORY} B")


@dataclass(frozen=True)
class BackwardVariant:
    """Everything that changes the backward kernels' code: the library cache key."""

    SOURCE: ClassVar[str] = "attention_backward.metal"
    dtype: torch.dtype
    dim_qk: int
    dim_v: int
    mask_kind: str = "none"
    mask_dtype: torch.dtype | None = None
    softcap: bool = False
    alibi: bool = False
    varlen: bool = False
    cu_seqlens_dtype: torch.dtype = torch.int32
    grad_lse: bool = False
    want_mask_grad: bool = False

    @property
    def rows(self) -> int:
        return ROWS_SMALL_D if max(self.dim_qk, self.dim_v) <= 128 else ROWS_LARGE_D

    @property
    def mma(self) -> bool:
        return max(self.dim_qk, self.dim_v) <= MMA_MAX_DIM

    @property
    def blocks(self) -> MmaBlocks:
        return mma_blocks(self.dtype, self.dim_qk, self.dim_v)

    @property
    def simdgroups(self) -> int:
        return self.blocks.simdgroups if self.mma else SIMDGROUPS

    @property
    def block(self) -> int:
        """Query rows (dQ) or keys (dK/dV) per threadgroup: 8 a simdgroup on simdgroup_matrix, else R."""
        return 8 * self.simdgroups if self.mma else SIMDGROUPS * self.rows

    def defines(self, param_count: int) -> dict:
        blocks = self.blocks
        return {"MMA": self.mma, "BK": blocks.stream, "HELD_IN_TG": blocks.held_in_tg,
                "DQK_PAD": -(-self.dim_qk // 8) * 8, "DV_PAD": -(-self.dim_v // 8) * 8,
                "K_PITCH": blocks.k_pitch, "V_PITCH": blocks.v_pitch,
                "IN_T": MSL_TYPES[self.dtype], "MASK_KIND": MASK_KINDS[self.mask_kind],
                "MASK_T": "uchar" if self.mask_kind != "additive" else MSL_TYPES[self.mask_dtype],
                "CU_T": "int" if self.cu_seqlens_dtype == torch.int32 else "long",
                "DQK": self.dim_qk, "DV": self.dim_v, "WM": self.simdgroups, "R": self.rows,
                "HAS_SOFTCAP": self.softcap, "HAS_ALIBI": self.alibi, "HAS_DLSE": self.grad_lse,
                "WANT_DMASK": self.want_mask_grad, "VARLEN": self.varlen, "BACKWARD_PARAM_COUNT": param_count,
                }


def backward(call: AttentionCall, grads: Gradients):
    """(dq, dk, dv, dsinks or None, dmask or None) (kernels/contract.py)."""
    q, k, v, attn_mask, alibi_slopes, sinks = call.q, call.k, call.v, call.attn_mask, call.alibi_slopes, call.sinks
    cu_seqlens_q, cu_seqlens_k, o = call.cu_seqlens_q, call.cu_seqlens_k, call.options
    grad_out, grad_lse, out, lse = grads.grad_out, grads.grad_lse, grads.out, grads.lse
    if o.dropout_p > 0:
        raise ValueError(f"dropout_p: the metal backward has no dropout (the torch backend serves it), got {o.dropout_p}")
    varlen, batch, lq, lk = call.varlen, call.batch, call.seqlen_q, call.seqlen_k
    heads_q, heads_kv = call.heads_q, call.heads_kv
    scale, softcap = o.scale, o.softcap
    want_mask_grad = grads.want_mask_grad and call.mask_kind == "additive"
    if call.empty:
        return empty_grads(q, k, v, sinks, grad_lse, attn_mask.shape if want_mask_grad else None)
    dq, dk, dv = (new_output(t.shape, t.dtype, t.device) for t in (q, k, v))

    lse = lse.contiguous()
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    dlse = None if grad_lse is None else grad_lse.to(torch.float32).contiguous()
    mask_kind = "none" if attn_mask is None else ("bool" if attn_mask.dtype == torch.bool else "additive")
    mask, mask_strides = bound_mask(attn_mask, q.device, batch, heads_q, lq, lk)
    slopes, slopes_stride = bound_slopes(alibi_slopes, q.device)
    variant = BackwardVariant(
        q.dtype, q.shape[-1], v.shape[-1], mask_kind, None if mask_kind != "additive" else mask.dtype,
        softcap > 0, alibi_slopes is not None, varlen, cu_seqlens_q.dtype if varlen else torch.int32,
        dlse is not None, want_mask_grad)
    params = ([s for t in (q, k, v, out, grad_out, dq, dk, dv) for s in bshd_strides(t)] + lse_strides(lse)
              + mask_strides + [slopes_stride] + [lq, lk, heads_q, heads_q // heads_kv, o.window_left, o.window_right]
              + [q.shape[0], k.shape[0], vector_row_bits(k, v, q, grad_out)])
    lib = library(variant, q.device, len(BACKWARD_PARAM_FIELDS))
    floats = placeholder(q.device, torch.float32)
    cu_q = cu_seqlens_q if varlen else placeholder(q.device, torch.int32)
    cu_k = cu_seqlens_k if varlen else placeholder(q.device, torch.int32)
    dmask_full = floats
    if want_mask_grad:
        dmask_full = torch.zeros((batch, heads_q, lq, lk), dtype=torch.float32, device=q.device)

    lib.attention_backward_preprocess(out, grad_out, floats if dlse is None else dlse, delta, params, cu_q, cu_k,
                                      threads=(32 * lq, heads_q, batch), group_size=(32, 1, 1))
    threads = 32 * variant.simdgroups
    common = (mask, slopes, cu_q, cu_k, params, float(scale), float(softcap))
    lib.attention_backward_dq(q, k, v, grad_out, lse, delta, dq, dmask_full, *common,
                              threads=(threads * math.ceil(lq / variant.block), heads_q, batch),
                              group_size=(threads, 1, 1))
    lib.attention_backward_dkdv(q, k, v, grad_out, lse, delta, dk, dv, *common,
                                threads=(threads * math.ceil(lk / variant.block), heads_kv, batch),
                                group_size=(threads, 1, 1))
    dsinks = None if sinks is None else _sink_grad(sinks, lse, delta, varlen)
    dmask = _reduce_to(dmask_full, attn_mask.shape) if want_mask_grad else None
    return dq, dk, dv, dsinks, dmask


def _sink_grad(sinks, lse, delta, varlen):
    """dsinks_h = -sum over rows of exp(sink_h - lse) delta (lse -inf rows: exp(...) = inf * 0 is
    excluded by where)."""
    shape = (-1, 1) if varlen else (1, -1, 1)
    weight = torch.exp(sinks.to(torch.float32).reshape(shape) - lse)
    terms = torch.where(torch.isfinite(lse), weight * delta, 0.0)
    return -terms.sum(dim=1 if varlen else (0, 2))


def _reduce_to(full: torch.Tensor, shape) -> torch.Tensor:
    """Sum a (B, Hq, Lq, Lk) gradient over the dims that the mask of `shape` broadcasts along."""
    lead = full.dim() - len(shape)
    padded = (1,) * lead + tuple(shape)
    dims = [d for d, n in enumerate(padded) if n == 1 and full.shape[d] != 1]
    reduced = full.sum(dim=dims, keepdim=True) if dims else full
    return reduced.reshape(shape)

