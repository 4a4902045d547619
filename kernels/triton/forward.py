"""Launching the triton forward kernel (forward_kernel.py): outputs, strides, grid, constexprs.

No host synchronization: everything passed is a shape, a stride, a Python scalar or a device tensor
(the dropout seed is read on the host only when dropout is on).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..contract import AttentionCall
from ..launch import BoundedMemo, empty_result, new_output

from . import forward_kernel, tma
from .binding import alibi_args, common_meta, dropout_args, mask_args, on_tensors_device, strides4
from .blocks import cdiv, forward_blocks
from .direct_launch import DirectLauncher

# Kernels relaunched without Triton's per-call binding once compiled for a kind of call (direct_launch.py).
_FORWARD = DirectLauncher(forward_kernel.attention_forward_kernel)


def _strided(t):
    return None if t is None else (t.dtype, t.shape, t.stride())


@dataclass(frozen=True)
class _Plan:
    """Everything of a forward launch but its tensors and float scalars, made once per launch key."""

    out_shape: tuple
    lse_shape: tuple
    grid: tuple
    ints: tuple  # the integer arguments between the tensors and (scale, softcap)
    window: tuple  # (left, right)
    options: dict  # constexprs and launch options


_plans = BoundedMemo()  # launch key -> _Plan (bounded)


def forget_plans() -> None:
    """Drop every launch plan and the kernels launched by them: a benchmark that swaps the block table
    (blocks.py) calls this."""
    _plans.clear()
    _FORWARD.forget()


def _make_plan(call: AttentionCall) -> _Plan:
    q, k, v, o = call.q, call.k, call.v, call.options
    batch, lq, lk = call.batch, call.seqlen_q, call.seqlen_k
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    out_shape = q.shape[:-1] + (v.shape[-1],)
    lse_shape = (heads_q, q.shape[0]) if call.varlen else (batch, heads_q, lq)
    meta, left, right = common_meta(call)
    blocks = forward_blocks(max(q.shape[-1], v.shape[-1]), q.dtype, o.causal, q.device.type, lq)
    _, mask_strides, _ = mask_args(call.attn_mask, q, batch, lq, lk)
    _, slope_strides = alibi_args(call.alibi_slopes, q)
    # out and lse are allocated contiguous (new_output); packed ones have batch stride 0 (strides4, lse_strides).
    out_strides, lse_strides_ = _contiguous_strides(out_shape), _contiguous_strides(lse_shape)
    out_strides = out_strides if len(out_strides) == 4 else (0, *out_strides)
    lse_strides_ = lse_strides_ if len(lse_strides_) == 3 else (0, *lse_strides_)
    ints = (*strides4(q), *strides4(k), *strides4(v), *out_strides, *lse_strides_, *mask_strides, *slope_strides,
            lq, lk, heads_q, heads_q // heads_kv)
    options = dict(SINKS_ON=call.sinks is not None, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
                   num_warps=blocks.num_warps, num_stages=blocks.num_stages,
                   TMA=tma.chosen(blocks.tma, k, v, strides4(k), strides4(v)), **meta)
    return _Plan(tuple(out_shape), lse_shape, (cdiv(lq, blocks.block_m), batch * heads_q), ints, (left, right), options)


def _pointer_loads(plan: _Plan) -> dict:
    return dict(plan.options, TMA=False)


def _contiguous_strides(shape) -> tuple:
    """The strides torch.empty(shape) has."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


@on_tensors_device
def forward(call: AttentionCall):
    """(out, lse) (kernels/contract.py). Per call: the launch key (shapes, strides, dtypes, lengths, windows,
    flags; never a tensor's values) and its remembered _Plan, the two allocations, the launch."""
    q, k, v, attn_mask, alibi_slopes, sinks = call.q, call.k, call.v, call.attn_mask, call.alibi_slopes, call.sinks
    cu_seqlens_q, cu_seqlens_k, o = call.cu_seqlens_q, call.cu_seqlens_k, call.options
    lq, lk = call.seqlen_q, call.seqlen_k
    if q.shape[0] == 0 or lq == 0 or (cu_seqlens_q is None and lk == 0):
        return empty_result(q, v, sinks)
    key = (q.device, q.dtype, q.shape, q.stride(), k.dtype, k.shape, k.stride(), v.dtype, v.shape, v.stride(),
           _strided(attn_mask), _strided(alibi_slopes), sinks is None, _strided(cu_seqlens_q), _strided(cu_seqlens_k),
           lq, lk, o.causal, o.window_left, o.window_right, o.softcap > 0, o.dropout_p > 0,
           (k.data_ptr() | v.data_ptr()) & 15)  # TMA needs 16-byte aligned K and V
    plan = _plans.get(key) or _plans.keep(key, _make_plan(call))
    out = new_output(plan.out_shape, q.dtype, q.device)
    lse = new_output(plan.lse_shape, torch.float32, q.device)
    mask = q if attn_mask is None else mask_args(attn_mask, q, call.batch, lq, lk)[0]
    tensors = (q, k, v, out, lse, mask, q if alibi_slopes is None else alibi_slopes, q if sinks is None else sinks,
               q if cu_seqlens_q is None else cu_seqlens_q, q if cu_seqlens_k is None else cu_seqlens_k)
    if o.dropout_p > 0:  # the seed is a per-call int: Triton's own classes decide
        seed, threshold, keep_scale = dropout_args(o.dropout_p, call.dropout_seed)
        args, known = (*tensors, *plan.ints, float(o.scale), float(o.softcap), *plan.window, seed, threshold,
                       keep_scale), None
    else:
        args, known = (*tensors, *plan.ints, float(o.scale), float(o.softcap), *plan.window, 0, 0, 1.0), key

    def launch(options):
        _FORWARD.launch(plan.grid, args, options, known=known, tensors=len(tensors))

    if not tma.launch(plan.options["TMA"], lambda: launch(plan.options), lambda: launch(_pointer_loads(plan))):
        _plans[key] = dataclasses.replace(plan, options=_pointer_loads(plan))
    return out, lse
