"""Launching the Metal forward kernel (attention_forward.metal): its variant (the library cache key),
parameters, strides, grid. No host synchronization here: everything passed is known on the host
(shapes, strides, Python scalars) or is a device tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mfa_hf.kernel_fallback import KernelUnavailable

from ..contract import AttentionCall
from ..launch import empty_result, new_output

from . import loader
from .binding import LOG2E, VECTOR_WIDTH, bound_floats, bound_mask, bound_slopes, placeholder, vector_row_layout
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


@dataclass(frozen=True)
class _Plan:
    """Everything of a forward launch but its tensors, the storage offsets' part of vector_rows and
    the scale scalars: remembered per launch key (see forward) for calls without a mask."""

    lib: object
    params: tuple  # PARAM_FIELDS but the last (vector_rows)
    layout_bits: int  # vector_rows' shape/stride part per tensor (bit 0 q, 1 k, 2 v)
    unit: float  # SCORE_UNIT
    out_shape: tuple
    lse_shape: tuple
    threads: tuple
    group_size: tuple
    libraries: dict  # loader.library_cache() when made (tests swap it: a plan follows)
    target: object  # the emulated target it was made for (None on mps)
    placeholders: tuple  # the device's (uchar mask, float, int) placeholders (binding.placeholder)


_plans: dict = {}


def _make_plan(q, k, v, mask_strides, mask_kind, mask_dtype, slopes_stride, batch, lq, lk, o, varlen, cu_dtype,
               has_alibi, has_sinks, target) -> _Plan:
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    heads_q, dim_v, rows_q = q_shape[-2], v_shape[-1], q_shape[0]  # rows_q: packed: total query rows; dense: B
    if varlen:  # out and lse are contiguous (new_output): (Tq, Hq, Dv) and (Hq, Tq)
        out_shape, lse_shape = (rows_q, heads_q, dim_v), (heads_q, rows_q)
    else:  # (B, Lq, Hq, Dv) and (B, Hq, Lq); plain tuples: torch.empty takes them faster than a torch.Size
        out_shape, lse_shape = (batch, lq, heads_q, dim_v), (batch, heads_q, lq)
    o_head = heads_q * dim_v
    out_lse = (0, o_head, dim_v, 1, 0, rows_q, 1) if varlen else (lq * o_head, o_head, dim_v, 1, heads_q * lq, lq, 1)
    long_positions = max(lq, lk, rows_q, k_shape[0], o.window_left, o.window_right) >= POSITION_LIMIT or (
        mask_kind != "none" and abs(mask_strides[3]) >= MASK_KEY_STRIDE_LIMIT)
    ingredients = (  # ForwardVariant's fields, in order
        q.dtype, q_shape[-1], dim_v, mask_kind, mask_dtype, o.softcap > 0, has_alibi, has_sinks, varlen, cu_dtype,
        long_positions)
    variant, lib = launch_target(ingredients, lambda: ForwardVariant(*ingredients), q.device, len(PARAM_FIELDS))
    config = variant.config()
    q_stride, k_stride, v_stride = q.stride(), k.stride(), v.stride()
    if varlen:  # packed (T, H, D): batch stride 0 (bshd_strides)
        q_stride, k_stride, v_stride = (0, *q_stride), (0, *k_stride), (0, *v_stride)
    params = (*q_stride, *k_stride, *v_stride, *out_lse, *mask_strides, slopes_stride,
              lq, lk, heads_q // k_shape[-2], o.window_left, o.window_right, rows_q, k_shape[0])
    layout_bits = sum(1 << n for n, t in enumerate((q, k, v)) if vector_row_layout(t.shape, t.stride()))
    return _Plan(lib, params, layout_bits, 1.0 if mask_kind == "additive" else LOG2E, out_shape, lse_shape,
                 (config.threads * -(-lq // config.query_block), heads_q, batch), (config.threads, 1, 1),
                 loader.library_cache(), target,
                 tuple(placeholder(q.device, t) for t in (torch.uint8, torch.float32, torch.int32)))


def vector_bits(layout_bits: int, q, k, v) -> int:
    """The kernel's `vector_rows` flags (binding.vector_rows for q, k, v): the plan's shape/stride
    part, and each tensor's storage offset, which is read on every call."""
    if layout_bits & 1 and q.storage_offset() % VECTOR_WIDTH:
        layout_bits &= ~1
    if layout_bits & 2 and k.storage_offset() % VECTOR_WIDTH:
        layout_bits &= ~2
    if layout_bits & 4 and v.storage_offset() % VECTOR_WIDTH:
        layout_bits &= ~4
    return layout_bits


def _plan_key(call: AttentionCall, target, batch: int, lq: int, lk: int, cu_dtype) -> tuple:
    q, k, v, o, alibi_slopes = call.q, call.k, call.v, call.options, call.alibi_slopes
    return (q.device, id(target), q.dtype, q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), batch, lq,
            lk, o.window_left, o.window_right, o.softcap > 0, None if alibi_slopes is None else alibi_slopes.dim(),
            call.sinks is None, cu_dtype)


def forward(call: AttentionCall):
    """(out, lse) (kernels/contract.py). Per call: the launch key (shapes, strides, lengths,
    windows, feature flags, dtype, device, emulated target) and its remembered _Plan (built on a
    miss, and on every call with a mask, whose strides the plan would have to key too), the output
    allocation, the storage offsets' vector_rows bits, the scales and the launch."""
    q, k, v, attn_mask, alibi_slopes, sinks = call.q, call.k, call.v, call.attn_mask, call.alibi_slopes, call.sinks
    cu_seqlens_q, o = call.cu_seqlens_q, call.options
    if o.dropout_p > 0:
        raise ValueError(f"dropout_p: the metal forward has no dropout (the torch backend serves it), got {o.dropout_p}")
    q_shape, k_shape = q.shape, k.shape
    varlen = cu_seqlens_q is not None
    if varlen:
        batch, lq, lk = cu_seqlens_q.numel() - 1, o.max_seqlen_q, o.max_seqlen_k
    else:
        batch, lq, lk = q_shape[0], q_shape[1], k_shape[1]
    if min(batch, lq, lk, q_shape[-2]) == 0:  # a Metal grid has no empty dimension (call.empty)
        return empty_result(q, v, sinks)
    device = q.device
    target = None if device.type == "mps" else loader.emulated_target()
    cu_dtype = cu_seqlens_q.dtype if varlen else torch.int32
    if attn_mask is None:
        key = _plan_key(call, target, batch, lq, lk, cu_dtype)
        plan = _plans.get(key)
        if plan is None or plan.libraries is not loader.library_cache() or plan.target is not target:
            if len(_plans) >= 4096:  # bounded: a new length per call must not grow it forever
                _plans.clear()
            plan = _plans[key] = _make_plan(q, k, v, (0, 0, 0, 0), "none", None, 0 if alibi_slopes is None or
                                            alibi_slopes.dim() == 1 else alibi_slopes.shape[-1], batch, lq, lk, o,
                                            varlen, cu_dtype, alibi_slopes is not None, sinks is not None, target)
        mask = plan.placeholders[0]
    else:
        heads_q = q_shape[-2]
        mask, mask_strides = bound_mask(attn_mask, device, batch, heads_q, lq, lk)
        kind, mask_dtype = ("bool", None) if attn_mask.dtype == torch.bool else ("additive", mask.dtype)
        slopes_stride = 0 if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes.shape[-1]
        plan = _make_plan(q, k, v, mask_strides, kind, mask_dtype, slopes_stride, batch, lq, lk, o, varlen, cu_dtype,
                          alibi_slopes is not None, sinks is not None, target)

    _, floats, ints = plan.placeholders
    slopes = floats if alibi_slopes is None else bound_slopes(alibi_slopes, device)[0]
    sink_logits = floats if sinks is None else bound_floats(sinks, device)
    cu_q, cu_k = (cu_seqlens_q, call.cu_seqlens_k) if varlen else (ints, ints)
    return _launch(plan, q, k, v, o, mask, slopes, sink_logits, cu_q, cu_k)


def _launch(plan: _Plan, q, k, v, o, mask, slopes, sink_logits, cu_q, cu_k) -> tuple:
    """Allocate out and lse and launch the plan's forward kernel on them."""
    out = new_output(plan.out_shape, q.dtype, q.device)
    lse = new_output(plan.lse_shape, torch.float32, q.device)
    softcap, unit = o.softcap, plan.unit
    q_scale = o.scale / softcap if softcap > 0 else o.scale * unit
    plan.lib.attention_forward(q, k, v, out, lse, [*plan.params, vector_bits(plan.layout_bits, q, k, v)], float(q_scale),
           float(softcap * unit), mask, slopes, sink_logits, cu_q, cu_k, threads=plan.threads,
           group_size=plan.group_size)
    return out, lse


def replay(call: AttentionCall):
    """After `forward(call)` ran: a function (q, k, v) -> (out, lse) launching the same library kernel with the same
    plan for later calls of exactly this kind, with no key or plan lookup (what every layer of every step pays on
    a Mac, besides torch's own dispatch); or None where there is none (only plain dense calls get one: no mask,
    helper tensors or packed sequences).

    The caller guarantees the kind: shapes, strides, dtypes, device and options (mfa_hf/repeat_calls.py). The
    replay checks, per call, what else the launch depends on: the library cache the plan was made with (tests swap
    it), the emulated target (macOS, torch, fast math: a context or the environment picks it), and the storage
    offsets (the kernel's vector_rows bits). A launch the runtime refuses returns None as well: the full path
    then hands the call to the fallback backend, with its warning (mfa_hf/kernel_fallback.py).
    """
    q, k, o = call.q, call.k, call.options
    if (call.attn_mask is not None or call.alibi_slopes is not None or call.sinks is not None or call.varlen
            or o.dropout_p > 0 or q.dim() != 4 or min(q.shape[0], q.shape[1], k.shape[1], q.shape[2]) == 0):
        return None
    device = q.device
    target = None if device.type == "mps" else loader.emulated_target()
    plan = _plans.get(_plan_key(call, target, q.shape[0], q.shape[1], k.shape[1], torch.int32))
    libraries = loader.library_cache()
    if plan is None or plan.libraries is not libraries or plan.target is not target:
        return None
    (mask, floats, ints), emulated = plan.placeholders, target is not None

    def launch(q, k, v):
        if loader.library_cache() is not libraries or (emulated and loader.emulated_target() is not target):
            return None
        try:
            return _launch(plan, q, k, v, o, mask, floats, floats, ints, ints)
        except KernelUnavailable:
            return None

    return launch
