"""Launching the triton backward kernels (backward_kernel.py): a dK/dV kernel, then a dQ kernel.

delta = rowsum(dO * O) - dLSE is a kernel of its own (one pass over O and dO); dsinks and the reduction of dS
over a broadcast mask's dims are torch ops on the device (small next to the kernels).

bf16_backward: Q, K, V and dO are handed to the same kernels as bfloat16 copies (O(N D) work next to
the kernels' O(N^2 D)), so every tl.dot takes bfloat16 operands (P and dS follow Q's dtype) and
accumulates in float32; delta is taken from the unrounded dO and O, and dQ/dK/dV are written in the
input dtype.
"""

from __future__ import annotations

import torch
import triton

from ..contract import AttentionCall, Gradients
from ..launch import empty_grads, new_output

from . import backward_kernel
from .binding import (alibi_args, common_meta, dot_precision, dropout_args, lse_strides, mask_args, on_tensors_device,
                      strides4)
from .blocks import backward_kv_blocks, backward_q_blocks, cdiv
from .direct_launch import DirectLauncher

# Kernels relaunched without Triton's per-call binding once compiled for a kind of call (direct_launch.py).
_BACKWARD_KV = DirectLauncher(backward_kernel.attention_backward_kv_kernel)
_BACKWARD_Q = DirectLauncher(backward_kernel.attention_backward_q_kernel)
_DELTA = DirectLauncher(backward_kernel.attention_backward_delta_kernel)


def _delta(grad_out, out, grad_lse, lse):
    """delta = rowsum(dO * O) - dLSE, float32, contiguous in the LSE's shape ((B, Hq, Lq) or packed (Hq, Tq)),
    from the unrounded dO and O in one pass (attention_backward_delta_kernel)."""
    rows, heads, dim_v = out.shape[-3], out.shape[-2], out.shape[-1]
    delta = new_output(lse.shape, torch.float32, out.device)
    block_dv = max(16, triton.next_power_of_2(dim_v))
    block_r = max(16, min(128, 8192 // block_dv))
    _DELTA[(cdiv(rows, block_r), delta.numel() // rows)](
        out, grad_out, out if grad_lse is None else grad_lse, delta, *strides4(out), *strides4(grad_out),
        *((0, 0, 0) if grad_lse is None else lse_strides(grad_lse)), rows, heads,
        HEAD_DV=dim_v, BLOCK_DV=block_dv, BLOCK_R=block_r, HAS_DLSE=grad_lse is not None, num_warps=4)
    return delta


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


@on_tensors_device
def backward(call: AttentionCall, grads: Gradients):
    """(dq, dk, dv, dsinks or None, dmask or None) (kernels/contract.py)."""
    q, k, v, attn_mask, alibi_slopes, sinks = call.q, call.k, call.v, call.attn_mask, call.alibi_slopes, call.sinks
    cu_seqlens_q, cu_seqlens_k, o = call.cu_seqlens_q, call.cu_seqlens_k, call.options
    grad_out, grad_lse, out, lse = grads.grad_out, grads.grad_lse, grads.out, grads.lse
    scale, softcap = o.scale, o.softcap
    batch, lq, lk = call.batch, call.seqlen_q, call.seqlen_k
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    write_ds = bool(grads.want_mask_grad and attn_mask is not None)
    if q.shape[0] == 0 or k.shape[0] == 0 or lq == 0 or lk == 0:
        return empty_grads(q, k, v, sinks, grad_lse, attn_mask.shape if write_ds else None)
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    delta = _delta(grad_out, out, grad_lse, lse)
    meta, left, right = common_meta(call)
    if o.bf16_backward:
        q, k, v, grad_out = (t.to(torch.bfloat16) for t in (q, k, v, grad_out))
        meta["DOT_PRECISION"] = dot_precision(torch.bfloat16, q.device)
    mask, mask_strides, _ = mask_args(attn_mask, q, batch, lq, lk)
    slopes, slope_strides = alibi_args(alibi_slopes, q)
    seed, threshold, keep_scale = dropout_args(o.dropout_p, call.dropout_seed)
    cu_q = q if cu_seqlens_q is None else cu_seqlens_q
    cu_k = q if cu_seqlens_k is None else cu_seqlens_k
    delta_strides = (0, delta.stride(0)) if delta.dim() == 2 else (delta.stride(0), delta.stride(1))
    shared = (*strides4(q), *strides4(k), *strides4(v), *strides4(grad_out), *lse_strides(lse),
              *delta_strides, *mask_strides, *slope_strides)
    scalars = (scale, softcap, left, right, seed, threshold, keep_scale)
    dim = max(q.shape[-1], v.shape[-1])

    kv = backward_kv_blocks(dim, q.dtype, o.causal, q.device.type, max(lq, lk))
    _BACKWARD_KV[(cdiv(lk, kv.block_n), batch * heads_kv)](
        q, k, v, grad_out, lse, delta, dk, dv, mask, slopes, cu_q, cu_k, *shared,
        *strides4(dk)[:3], *strides4(dv)[:3], lq, lk, heads_q, heads_kv, heads_q // heads_kv, *scalars,
        BLOCK_M=kv.block_m, BLOCK_N=kv.block_n, num_warps=kv.num_warps, num_stages=kv.num_stages, **meta)

    ds = torch.zeros((batch, heads_q, lq, lk), dtype=torch.float32, device=q.device) if write_ds else q
    qb = backward_q_blocks(dim, q.dtype, o.causal, q.device.type)
    _BACKWARD_Q[(cdiv(lq, qb.block_m), batch * heads_q)](
        q, k, v, grad_out, lse, delta, dq, ds, mask, slopes, cu_q, cu_k, *shared, *strides4(dq)[:3],
        lq, lk, heads_q, heads_q // heads_kv, *scalars, WRITE_DS=write_ds, BLOCK_M=qb.block_m,
        BLOCK_N=qb.block_n, num_warps=qb.num_warps, num_stages=qb.num_stages, **meta)

    dmask = _reduce_to(ds, attn_mask.shape) if write_ds else None
    return dq, dk, dv, _sink_grad(sinks, lse, delta), dmask
