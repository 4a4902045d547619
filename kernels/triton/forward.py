"""Launching the triton forward kernel (forward_kernel.py): outputs, strides, grid, constexprs.

No host synchronization: everything passed is a shape, a stride, a Python scalar or a device tensor
(the dropout seed is read on the host only when dropout is on).
"""

from __future__ import annotations

import torch

from ..contract import AttentionCall
from ..launch import empty_result, new_output

from . import forward_kernel
from .binding import alibi_args, common_meta, dropout_args, lse_strides, mask_args, on_tensors_device, strides4
from .blocks import cdiv, forward_blocks
from .direct_launch import DirectLauncher

# Kernels relaunched without Triton's per-call binding once compiled for a kind of call (direct_launch.py).
_FORWARD = DirectLauncher(forward_kernel.attention_forward_kernel)



@on_tensors_device
def forward(call: AttentionCall):
    """(out, lse) (kernels/contract.py)."""
    q, k, v, attn_mask, alibi_slopes, sinks = call.q, call.k, call.v, call.attn_mask, call.alibi_slopes, call.sinks
    cu_seqlens_q, cu_seqlens_k, o = call.cu_seqlens_q, call.cu_seqlens_k, call.options
    scale, softcap, dropout_p = o.scale, o.softcap, o.dropout_p
    batch, lq, lk = call.batch, call.seqlen_q, call.seqlen_k
    if q.shape[0] == 0 or lq == 0 or (cu_seqlens_q is None and lk == 0):
        return empty_result(q, v, sinks)
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    out = new_output(q.shape[:-1] + (v.shape[-1],), q.dtype, q.device)
    lse_shape = (heads_q, q.shape[0]) if cu_seqlens_q is not None else (batch, heads_q, lq)
    lse = new_output(lse_shape, torch.float32, q.device)
    meta, left, right = common_meta(call)
    blocks = forward_blocks(max(q.shape[-1], v.shape[-1]), q.dtype, o.causal, q.device.type, lq)
    mask, mask_strides, _ = mask_args(attn_mask, q, batch, lq, lk)
    slopes, slope_strides = alibi_args(alibi_slopes, q)
    seed, threshold, keep_scale = dropout_args(dropout_p, call.dropout_seed)
    cu_q = q if cu_seqlens_q is None else cu_seqlens_q
    cu_k = q if cu_seqlens_k is None else cu_seqlens_k
    grid = (cdiv(lq, blocks.block_m), batch * heads_q)
    _FORWARD[grid](
        q, k, v, out, lse, mask, slopes, q if sinks is None else sinks, cu_q, cu_k,
        *strides4(q), *strides4(k), *strides4(v), *strides4(out), *lse_strides(lse), *mask_strides,
        *slope_strides, lq, lk, heads_q, heads_q // heads_kv, scale, softcap, left, right, seed, threshold,
        keep_scale, SINKS_ON=sinks is not None, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, **meta)
    return out, lse
