"""The `triton` backend: Triton kernels for CUDA tensors (forward, backward, every dense/varlen feature).

Importing this module imports triton; where triton is missing the ImportError makes dispatch report
the backend unavailable with that reason. With TRITON_INTERPRET=1 in the environment before triton
is imported, the same kernels serve CPU tensors through Triton's interpreter (how CI tests them on
machines without a GPU; tests/triton starts such a process itself).
"""

from __future__ import annotations


import torch
import triton

from mfa_hf.kernels.dropout import MASK32, drop_threshold
from mfa_hf.ops import define_attention_ops, empty_result, new_output
from mfa_hf.problem import AttentionProblem, MaskKind

from . import backward as _compiled_backward
from . import forward as _compiled_forward
from .blocks import backward_kv_blocks, backward_q_blocks, forward_blocks, interpreting, padded_dim

NAME = "triton"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(problem: AttentionProblem) -> tuple[bool, str]:
    devices = ("cuda", "cpu") if interpreting() else ("cuda",)
    if problem.device_type not in devices:
        return False, f"the triton backend serves cuda tensors, got {problem.device_type}"
    if problem.dtype not in DTYPES:
        return False, f"the triton kernels take float16, bfloat16 or float32, got {problem.dtype}"
    if problem.kv_format != "none":
        return False, f"quantized KV caches ({problem.kv_format}) have no Triton decode kernel yet"
    return True, "the triton kernels serve this problem"


def _kernels(device: torch.device):
    """(forward module, backward module). Under TRITON_INTERPRET=1 they run CPU tensors in numpy."""
    return _compiled_forward, _compiled_backward


# ---------------------------------------------------------------------------------------------
# Argument plumbing: every tensor is addressed through strides, broadcast dimensions with stride 0.

def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, seq, head, dim) strides; a packed (T, H, D) tensor has batch stride 0."""
    return tuple(t.stride()) if t.dim() == 4 else (0, *t.stride())


def _lse_strides(lse: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of (B, Hq, Lq) or packed (Hq, Tq)."""
    return tuple(lse.stride()) if lse.dim() == 3 else (0, *lse.stride())


def _mask_args(attn_mask, q, batch: int, lq: int, lk: int):
    if attn_mask is None:
        return q, (0, 0, 0, 0), 0
    mask = attn_mask.view(torch.uint8) if attn_mask.dtype == torch.bool else attn_mask
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(batch, q.shape[-2], lq, lk)
    return mask, tuple(mask.stride()), 1 if attn_mask.dtype == torch.bool else 2


def _alibi_args(alibi_slopes, q):
    if alibi_slopes is None:
        return q, (0, 0)
    if alibi_slopes.dim() == 1:
        return alibi_slopes, (0, alibi_slopes.stride(0))
    return alibi_slopes, tuple(alibi_slopes.stride())


def _dropout_args(dropout_p: float, dropout_seed):
    if dropout_p == 0:
        return 0, 0, 1.0
    return int(dropout_seed.item()) & MASK32, drop_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def _shape(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    """(batch, Lq, Lk) as the grid sees them (maximum lengths for packed sequences)."""
    if cu_seqlens_q is None:
        return q.shape[0], q.shape[1], k.shape[1]
    return cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32:
        return "ieee"  # tf32 would carry ~1e-3 relative error: float32 callers expect float32 accuracy
    return "upcast" if device.type == "cpu" and dtype == torch.bfloat16 else "tf32"


def _common_meta(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, causal, window_left, window_right,
                 softcap, dropout_p):
    right = 0 if causal else window_right
    return dict(
        HEAD_DQK=q.shape[-1], HEAD_DV=v.shape[-1], BLOCK_DQK=padded_dim(q.shape[-1]),
        BLOCK_DV=padded_dim(v.shape[-1]), HAS_LEFT=window_left >= 0, HAS_RIGHT=right >= 0,
        SOFTCAP=softcap > 0, ALIBI=alibi_slopes is not None,
        MASK_KIND=0 if attn_mask is None else (1 if attn_mask.dtype == torch.bool else 2),
        VARLEN=cu_seqlens_q is not None, DROPOUT=dropout_p > 0,
        DOT_PRECISION=_dot_precision(q.dtype, q.device),
    ), max(window_left, 0), max(right, 0)


# ---------------------------------------------------------------------------------------------

def forward(q, k, v, attn_mask, alibi_slopes, sinks, cu_seqlens_q, cu_seqlens_k, dropout_seed,
            max_seqlen_q, max_seqlen_k, scale, causal, window_left, window_right, softcap, dropout_p):
    batch, lq, lk = _shape(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    if q.shape[0] == 0 or lq == 0 or (cu_seqlens_q is None and lk == 0):
        return empty_result(q, v, sinks)
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    out = new_output(q.shape[:-1] + (v.shape[-1],), q.dtype, q.device)
    lse_shape = (heads_q, q.shape[0]) if cu_seqlens_q is not None else (batch, heads_q, lq)
    lse = new_output(lse_shape, torch.float32, q.device)
    meta, left, right = _common_meta(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, causal, window_left,
                                     window_right, softcap, dropout_p)
    blocks = forward_blocks(max(q.shape[-1], v.shape[-1]), q.dtype, causal, q.device.type)
    mask, mask_strides, _ = _mask_args(attn_mask, q, batch, lq, lk)
    slopes, slope_strides = _alibi_args(alibi_slopes, q)
    seed, threshold, keep_scale = _dropout_args(dropout_p, dropout_seed)
    cu_q = q if cu_seqlens_q is None else cu_seqlens_q
    cu_k = q if cu_seqlens_k is None else cu_seqlens_k
    grid = (triton.cdiv(lq, blocks.block_m), batch * heads_q)
    fwd, _ = _kernels(q.device)
    fwd.attention_forward_kernel[grid](
        q, k, v, out, lse, mask, slopes, q if sinks is None else sinks, cu_q, cu_k,
        *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(out), *_lse_strides(lse), *mask_strides,
        *slope_strides, lq, lk, heads_q, heads_q // heads_kv, scale, softcap, left, right, seed, threshold,
        keep_scale, SINKS_ON=sinks is not None, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, **meta)
    return out, lse


def _delta(grad_out, out, grad_lse):
    """delta = rowsum(dO * O) - dLSE, float32, contiguous in the LSE's layout."""
    delta = (grad_out.float() * out.float()).sum(-1)  # (B, Lq, Hq) or (T, Hq)
    delta = delta.transpose(-1, -2).contiguous()
    if grad_lse is not None:
        delta = delta - grad_lse.float()
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


def backward(grad_out, grad_lse, q, k, v, out, lse, attn_mask, alibi_slopes, sinks, cu_seqlens_q,
             cu_seqlens_k, dropout_seed, max_seqlen_q, max_seqlen_k, scale, causal, window_left,
             window_right, softcap, dropout_p, want_mask_grad):
    batch, lq, lk = _shape(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    write_ds = bool(want_mask_grad and attn_mask is not None)
    if q.shape[0] == 0 or k.shape[0] == 0 or lq == 0 or lk == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        dsinks = None if sinks is None else torch.zeros(sinks.shape, dtype=torch.float32, device=q.device)
        dmask = torch.zeros(attn_mask.shape, dtype=torch.float32, device=q.device) if write_ds else None
        return dq, dk, dv, dsinks, dmask
    delta = _delta(grad_out, out, grad_lse)
    meta, left, right = _common_meta(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, causal, window_left,
                                     window_right, softcap, dropout_p)
    mask, mask_strides, _ = _mask_args(attn_mask, q, batch, lq, lk)
    slopes, slope_strides = _alibi_args(alibi_slopes, q)
    seed, threshold, keep_scale = _dropout_args(dropout_p, dropout_seed)
    cu_q = q if cu_seqlens_q is None else cu_seqlens_q
    cu_k = q if cu_seqlens_k is None else cu_seqlens_k
    delta_strides = (0, delta.stride(0)) if delta.dim() == 2 else (delta.stride(0), delta.stride(1))
    shared = (*_strides4(q), *_strides4(k), *_strides4(v), *_strides4(grad_out), *_lse_strides(lse),
              *delta_strides, *mask_strides, *slope_strides)
    scalars = (scale, softcap, left, right, seed, threshold, keep_scale)
    dim = max(q.shape[-1], v.shape[-1])

    kv = backward_kv_blocks(dim, q.dtype, causal, q.device.type)
    _, bwd = _kernels(q.device)
    bwd.attention_backward_kv_kernel[(triton.cdiv(lk, kv.block_n), batch * heads_kv)](
        q, k, v, grad_out, lse, delta, dk, dv, mask, slopes, cu_q, cu_k, *shared,
        *_strides4(dk)[:3], *_strides4(dv)[:3], lq, lk, heads_q, heads_kv, heads_q // heads_kv, *scalars,
        BLOCK_M=kv.block_m, BLOCK_N=kv.block_n, num_warps=kv.num_warps, num_stages=kv.num_stages, **meta)

    ds = torch.zeros((batch, heads_q, lq, lk), dtype=torch.float32, device=q.device) if write_ds else q
    qb = backward_q_blocks(dim, q.dtype, causal, q.device.type)
    bwd.attention_backward_q_kernel[(triton.cdiv(lq, qb.block_m), batch * heads_q)](
        q, k, v, grad_out, lse, delta, dq, ds, mask, slopes, cu_q, cu_k, *shared, *_strides4(dq)[:3],
        lq, lk, heads_q, heads_q // heads_kv, *scalars, WRITE_DS=write_ds, BLOCK_M=qb.block_m,
        BLOCK_N=qb.block_n, num_warps=qb.num_warps, num_stages=qb.num_stages, **meta)

    dmask = _reduce_to(ds, attn_mask.shape) if write_ds else None
    return dq, dk, dv, _sink_grad(sinks, lse, delta), dmask


OPS = define_attention_ops(NAME, forward, backward)
