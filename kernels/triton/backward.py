"""Launching the triton backward kernels (backward_kernel.py): a dK/dV kernel, then a dQ kernel.

delta = rowsum(dO * O) - dLSE is a kernel of its own (one pass over O and dO); dsinks and the reduction of dS
over a broadcast mask's dims are torch ops on the device (small next to the kernels).

bf16_backward: Q, K, V and dO are handed to the same kernels as bfloat16 copies (O(N D) work next to
the kernels' O(N^2 D)), so every tl.dot takes bfloat16 operands (P and dS follow Q's dtype) and
accumulates in float32; delta is taken from the unrounded dO and O, and dQ/dK/dV are written in the
input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..contract import AttentionCall, Gradients
from ..launch import BoundedMemo, contiguous_strides, empty_grads, new_output

from . import backward_kernel
from .binding import (alibi_args, common_meta, dot_precision, dropout_args, lse_strides, mask_args, on_tensors_device,
                      strides4)
from .blocks import backward_kv_blocks, backward_q_blocks, cdiv
from .direct_launch import DirectLauncher
from .forward import launch_key as forward_key

# Kernels relaunched without Triton's per-call binding once compiled for a kind of call (direct_launch.py).
_BACKWARD_KV = DirectLauncher(backward_kernel.attention_backward_kv_kernel)
_BACKWARD_Q = DirectLauncher(backward_kernel.attention_backward_q_kernel)
_DELTA = DirectLauncher(backward_kernel.attention_backward_delta_kernel)

# The dK/dV kernel's tile as keys x queries (backward_kernel._kv_step), as FlexAttention's backward computes it: P^T
# and dS^T feed the dV and dK products without a transpose. Off: timed on an H100 (session 23,
# benchmarks/results/h100-backward-sweep-2026-12-06-session23.log and ...-flex-keys-as-rows-...) it needs Flex's
# dK/dV shape (64, 128, 8, 3) to pay (with ours (128, 64, 8, 2) it ran 1.7-3x slower), and with it fwd+bwd at d 128
# was even to 8% faster on plain full/causal problems (GQA 8k full 9.86 vs 10.72 ms; GQA 8k causal 1.5% slower) but
# 12-23% slower with softcap and 14% with a 1024-key window at 2k. Read when a plan is made (forget_plans after
# flipping it).
KV_KEYS_AS_ROWS = False


def _sink_grad(sinks, lse, delta):
    """dsink_h = -sum_i exp(sink_h - lse_i) * delta_i (the sink's share of each row's softmax)."""
    if sinks is None:
        return None
    head_dim_first = lse if lse.dim() == 2 else lse.transpose(0, 1)  # (Hq, ...rows)
    weights = torch.exp(sinks.float().reshape(-1, *([1] * (head_dim_first.dim() - 1))) - head_dim_first)
    rows = delta if delta.dim() == 2 else delta.transpose(0, 1)
    return -(weights * rows).reshape(weights.shape[0], -1).sum(-1)


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a (B, Hq, Lq, Lk) gradient over the dimensions the mask broadcast along."""
    padded = (1,) * (4 - len(shape)) + tuple(shape)
    dims = [d for d, size in enumerate(padded) if size == 1 and grad.shape[d] != 1]
    if not dims:  # sum(dim=[]) would reduce every dimension
        return grad.reshape(shape)
    return grad.sum(dim=dims, keepdim=True).reshape(shape)


@dataclass(frozen=True)
class _Plan:
    """Everything of a backward's three launches but its tensors and float scalars, made once per launch key."""

    delta_grid: tuple
    delta_ints: tuple
    delta_options: dict
    kv_grid: tuple
    kv_ints: tuple  # the dK/dV kernel's integers between its tensors and (scale, softcap)
    kv_options: dict
    q_grid: tuple
    q_ints: tuple
    q_options: dict
    window: tuple  # (left, right)


_plans = BoundedMemo()  # launch key -> _Plan (bounded)


def forget_plans() -> None:
    """Drop every backward plan and the kernels launched by them: a benchmark that swaps the backward's block
    tables (blocks.py) calls this (forward.forget_plans does, for both passes)."""
    _plans.clear()
    for launcher in (_BACKWARD_KV, _BACKWARD_Q, _DELTA):
        launcher.forget()


def _writes_mask_grad(call: AttentionCall, grads: Gradients) -> bool:
    """Whether the dQ kernel writes dS for the mask's gradient (a float mask that asked for one)."""
    return bool(grads.want_mask_grad and call.attn_mask is not None)


def _launch_key(call: AttentionCall, grads: Gradients) -> tuple:
    """What the plan depends on: the forward's key (shapes, strides, dtypes, lengths, window, flags), the
    gradients' layouts, the mask gradient and bf16_backward; never a tensor's values."""
    grad_out, grad_lse, lse, o = grads.grad_out, grads.grad_lse, grads.lse, call.options
    return (forward_key(call), grad_out.dtype, grad_out.stride(), grads.out.stride(), lse.shape, lse.stride(),
            None if grad_lse is None else grad_lse.stride(), _writes_mask_grad(call, grads),
            o.bf16_backward)


def _make_plan(call: AttentionCall, grads: Gradients, q, k, v, grad_out) -> _Plan:
    """The plan of this backward: q, k, v and grad_out as the kernels read them (bfloat16 copies under
    bf16_backward, whose strides follow from the originals')."""
    o, batch, lq, lk = call.options, call.batch, call.seqlen_q, call.seqlen_k
    out, lse, grad_lse = grads.out, grads.lse, grads.grad_lse
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    rows, dim_v = out.shape[-3], out.shape[-1]
    block_dv = max(16, triton.next_power_of_2(dim_v))
    block_r = max(16, min(128, 8192 // block_dv))
    # delta reads the unrounded dO (grads.grad_out), not the bfloat16 copy the other kernels get under bf16_backward
    delta_ints = (*strides4(out), *strides4(grads.grad_out),
                  *((0, 0, 0) if grad_lse is None else lse_strides(grad_lse)),
                  rows, out.shape[-2])
    delta_options = dict(HEAD_DV=dim_v, BLOCK_DV=block_dv, BLOCK_R=block_r, HAS_DLSE=grad_lse is not None,
                         num_warps=4)
    delta_strides = contiguous_strides(lse.shape)  # delta is allocated contiguous in the LSE's shape
    delta_strides = (0, delta_strides[0]) if len(delta_strides) == 2 else delta_strides[:2]
    meta, left, right = common_meta(call)
    if o.bf16_backward:
        meta["DOT_PRECISION"] = dot_precision(torch.bfloat16, q.device)
    _, mask_strides, _ = mask_args(call.attn_mask, q, batch, lq, lk)
    _, slope_strides = alibi_args(call.alibi_slopes, q)
    shared = (*strides4(q), *strides4(k), *strides4(v), *strides4(grad_out), *lse_strides(lse),
              *delta_strides, *mask_strides, *slope_strides)
    grad_strides = [contiguous_strides(t.shape) for t in (q, k, v)]  # dq, dk, dv: new_output, contiguous
    dq_strides, dk_strides, dv_strides = ((0, *s) if len(s) == 3 else s for s in grad_strides)
    dim = max(q.shape[-1], v.shape[-1])
    kv = backward_kv_blocks(dim, q.dtype, o.causal, q.device.type, max(lq, lk))
    qb = backward_q_blocks(dim, q.dtype, o.causal, q.device.type, max(lq, lk), o.window_left >= 0)
    write_ds = _writes_mask_grad(call, grads)
    return _Plan(
        (cdiv(rows, block_r), lse.numel() // rows), delta_ints, delta_options,
        (cdiv(lk, kv.block_n), batch * heads_kv),
        (*shared, *dk_strides[:3], *dv_strides[:3], lq, lk, heads_q, heads_kv, heads_q // heads_kv),
        dict(BLOCK_M=kv.block_m, BLOCK_N=kv.block_n, num_warps=kv.num_warps, num_stages=kv.num_stages,
             KEYS_AS_ROWS=KV_KEYS_AS_ROWS, **meta),
        (cdiv(lq, qb.block_m), batch * heads_q),
        (*shared, *dq_strides[:3], lq, lk, heads_q, heads_q // heads_kv),
        dict(WRITE_DS=write_ds, BLOCK_M=qb.block_m, BLOCK_N=qb.block_n, num_warps=qb.num_warps,
             num_stages=qb.num_stages, **meta),
        (left, right))


@on_tensors_device
def backward(call: AttentionCall, grads: Gradients):
    """(dq, dk, dv, dsinks or None, dmask or None) (kernels/contract.py). Per call: the launch key and its
    remembered _Plan, the allocations, three launches (delta, dK/dV, dQ)."""
    q, k, v, attn_mask, alibi_slopes, sinks = call.q, call.k, call.v, call.attn_mask, call.alibi_slopes, call.sinks
    cu_seqlens_q, cu_seqlens_k, o = call.cu_seqlens_q, call.cu_seqlens_k, call.options
    grad_out, grad_lse, out, lse = grads.grad_out, grads.grad_lse, grads.out, grads.lse
    batch, lq, lk = call.batch, call.seqlen_q, call.seqlen_k
    write_ds = _writes_mask_grad(call, grads)
    if q.shape[0] == 0 or k.shape[0] == 0 or lq == 0 or lk == 0:
        return empty_grads(q, k, v, sinks, grad_lse, attn_mask.shape if write_ds else None)
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    delta = new_output(lse.shape, torch.float32, q.device)
    if o.bf16_backward:
        q, k, v, grad_out = (t.to(torch.bfloat16) for t in (q, k, v, grad_out))
    key = _launch_key(call, grads)
    plan = _plans.get(key) or _plans.keep(key, _make_plan(call, grads, q, k, v, grad_out))
    # A launch plan's key determines every integer and keyword, so the launchers look kernels up by it; a dropout
    # seed is a per-call integer, whose Triton classes the launchers work out themselves.
    known = key if o.dropout_p == 0 else None
    _DELTA.launch(plan.delta_grid, (out, grads.grad_out, out if grad_lse is None else grad_lse, delta,
                                    *plan.delta_ints), plan.delta_options, known=key, tensors=4)
    mask = q if attn_mask is None else mask_args(attn_mask, q, batch, lq, lk)[0]
    slopes = q if alibi_slopes is None else alibi_slopes
    cu_q = q if cu_seqlens_q is None else cu_seqlens_q
    cu_k = q if cu_seqlens_k is None else cu_seqlens_k
    scalars = (float(o.scale), float(o.softcap), *plan.window, *dropout_args(o.dropout_p, call.dropout_seed))
    _BACKWARD_KV.launch(plan.kv_grid, (q, k, v, grad_out, lse, delta, dk, dv, mask, slopes, cu_q, cu_k,
                                       *plan.kv_ints, *scalars), plan.kv_options, known=known, tensors=12)
    ds = torch.zeros((batch, q.shape[-2], lq, lk), dtype=torch.float32, device=q.device) if write_ds else q
    _BACKWARD_Q.launch(plan.q_grid, (q, k, v, grad_out, lse, delta, dq, ds, mask, slopes, cu_q, cu_k,
                                     *plan.q_ints, *scalars), plan.q_options, known=known, tensors=12)
    dmask = _reduce_to(ds, attn_mask.shape) if write_ds else None
    return dq, dk, dv, _sink_grad(sinks, lse, delta), dmask
