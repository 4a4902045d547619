"""torch.library custom ops for the attention backends: one schema, one fake, one autograd rule.

Each backend supplies a forward and a backward implementation with the signature below; this module
wraps them as `mfa_hf::<backend>_attention_fwd/_bwd` ops with shared fake (meta) implementations
and registered autograd, so torch.compile(fullgraph=True) sees opaque ops and no graph breaks.

Layouts: dense q (B, Lq, Hq, Dqk), k (B, Lk, Hkv, Dqk), v (B, Lk, Hkv, Dv) -> out (B, Lq, Hq, Dv),
lse (B, Hq, Lq). Packed (varlen, cu_seqlens given): q (Tq, Hq, D) ... -> out (Tq, Hq, Dv), lse (Hq, Tq).
"""

# No `from __future__ import annotations`: custom_op infers the schema from real annotations.
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import kernel_fallback, kv_formats, trace
from .kernel_fallback import Fallback
from .problem import AttentionProblem, MaskKind


# Tests set this so that every backend allocates its outputs filled with NaN: an element a kernel
# forgets to write then fails the comparison instead of passing by luck.
POISON_OUTPUTS = False


def new_output(shape, dtype, device) -> Tensor:
    """Allocate a kernel output (NaN-filled while POISON_OUTPUTS is set)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def plain_eager(args) -> bool:
    """Whether calling an op's implementation directly is the same as calling the op.

    True in plain eager code: not compiling or tracing (fake tensors and make_fx run under a dispatch
    mode), no functorch transform (vmap, grad), no tensor subclass, and no autograd graph to record.
    The dispatcher costs ~18 µs of host time per call on a fast x86 core and ~56 µs on the H100
    machine's host (host_overhead.py), paid by every layer of every decode step.
    """
    if torch.compiler.is_compiling():  # checked first: dynamo folds it and traces nothing below
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    grad = torch.is_grad_enabled()
    for arg in args:
        kind = type(arg)
        if kind is Tensor or kind is torch.nn.Parameter:
            if grad and arg.requires_grad:
                return False
        elif kind not in _SCALARS and isinstance(arg, Tensor):  # a subclass: FakeTensor, DTensor, ...
            return False
    return True


_SCALARS = frozenset((int, float, bool, str, type(None)))


class EagerShortcut:
    """A registered custom op that plain eager calls (plain_eager) bypass, running its implementation
    directly; compiled, traced and autograd calls go through `op` (fake, autograd, opcheck)."""

    def __init__(self, op: Callable, impl: Callable):
        self.op = op
        self.impl = impl

    def __call__(self, *args):
        return self.impl(*args) if plain_eager(args) else self.op(*args)


@dataclass(frozen=True)
class AttentionOps:
    forward: EagerShortcut  # the forward op (autograd registered), with its eager shortcut
    backward: Callable


def describe(q, k, v, attn_mask, alibi_slopes, sinks, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
             causal, window_left, window_right, softcap, dropout_p, kv_format="none", needs_grad=False):
    """An AttentionProblem from validated tensors (no checks here: problem.py did them)."""
    varlen = cu_seqlens_q is not None
    mask = MaskKind.NONE
    if attn_mask is not None:
        mask = MaskKind.BOOL if attn_mask.dtype == torch.bool else MaskKind.ADDITIVE
    return AttentionProblem(
        device_type=q.device.type,
        dtype=q.dtype,
        batch=(cu_seqlens_q.numel() - 1) if varlen else q.shape[0],
        seqlen_q=max_seqlen_q if varlen else q.shape[1],
        seqlen_k=max_seqlen_k if varlen else k.shape[1],
        heads_q=q.shape[-2],
        heads_kv=k.shape[-2],
        head_dim_qk=q.shape[-1],
        head_dim_v=v.shape[-1],
        causal=causal,
        window=(window_left, window_right),
        softcap=softcap,
        has_alibi=alibi_slopes is not None,
        has_sinks=sinks is not None,
        mask=mask,
        varlen=varlen,
        dropout_p=dropout_p,
        kv_format=kv_format,
        needs_grad=needs_grad,
        largest_span=_largest_span(q, k, v, attn_mask),
    )


def _span(t, first: int) -> int:
    """1 + the largest element offset a tensor's strides reach from its data pointer over its dims from
    `first` on (dense tensors skip the batch: kernels offset batches in 64 bits); 0 when empty. It runs
    on every call: contiguous tensors take a shortcut, the rest a plain loop."""
    if t is None:
        return 0
    if type(t) is not Tensor:
        t = getattr(t, "codes", t)  # a QuantizedKV cache: its codes are what kernels index
    if t.is_contiguous():  # the common case, exactly: the elements of one batch row (or all)
        count = t.numel()
        return count // t.shape[0] if first and count else count
    sizes, strides = t.shape, t.stride()
    span = 1
    for i in range(first, len(sizes)):
        if sizes[i] == 0:
            return 0
        span += (sizes[i] - 1) * strides[i]
    return span if t.numel() else 0


def _largest_span(q, k, v, attn_mask) -> int:
    first = 1 if q.dim() == 4 else 0
    shape = q.shape
    out = shape[-3] * shape[-2] * v.shape[-1] if first else shape[0] * shape[1] * v.shape[-1]
    return max(_span(q, first), _span(k, first), _span(v, first), _span(attn_mask, first), out)


def _record(backend: str, op: str, problem: AttentionProblem) -> None:
    trace.record(backend, op, problem.dtype, problem.head_dim_qk, problem.seqlen_q, problem.seqlen_k,
                 problem.flags())


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """LSE is float32, except for float64 inputs (torch backend only), which keep their precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(q, k, v, *_args):
    out = q.new_empty(q.shape[:-2] + (q.shape[-2], v.shape[-1]))
    if q.dim() == 3:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype(q.dtype))
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=lse_dtype(q.dtype))
    return out, lse


def _fake_backward(grad_out, grad_lse, q, k, v, out, lse, attn_mask, alibi_slopes, sinks, *rest):
    want_mask_grad = rest[-1]
    dsinks = q.new_empty(sinks.shape if sinks is not None else (0,), dtype=lse_dtype(q.dtype))
    dmask = q.new_empty(attn_mask.shape if want_mask_grad else (0,), dtype=lse_dtype(q.dtype))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks, dmask


def define_attention_ops(backend: str, forward_impl: Callable, backward_impl: Optional[Callable],
                         device_types=None, backward_op: Optional[Callable] = None,
                         fallback: Optional[tuple[Fallback, Fallback]] = None) -> AttentionOps:
    """Register mfa_hf::{backend}_attention_fwd/_bwd around the backend's implementations.

    fallback: the (forward, backward) of the backend that serves a call whose kernel raises
    KernelUnavailable (mfa_hf/kernel_fallback.py); the trace names the backend that computed it.

    backward_op: another backend's registered backward op (its AttentionOps.backward) to use
    instead of registering one here (backward_impl is then unused): the trace then names the
    backend that really computed the gradients.

    forward_impl(q, k, v, attn_mask, alibi_slopes, sinks, cu_seqlens_q, cu_seqlens_k, dropout_seed,
    max_seqlen_q, max_seqlen_k, scale, causal, window_left, window_right, softcap, dropout_p)
    -> (out, lse). backward_impl(grad_out, grad_lse, q, k, v, out, lse, <the forward's arguments
    from attn_mask on>, want_mask_grad) -> (dq, dk, dv, dsinks or None, dmask or None).
    """

    def attention_fwd_impl(
        q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], alibi_slopes: Optional[Tensor],
        sinks: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
        dropout_seed: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool,
        window_left: int, window_right: int, softcap: float, dropout_p: float,
    ) -> tuple[Tensor, Tensor]:
        result, served = kernel_fallback.call(
            backend, forward_impl, fallback and fallback[0],
            (q, k, v, attn_mask, alibi_slopes, sinks, cu_seqlens_q, cu_seqlens_k, dropout_seed, max_seqlen_q,
             max_seqlen_k, scale, causal, window_left, window_right, softcap, dropout_p))
        if trace.enabled():
            _record(served, "fwd", describe(q, k, v, attn_mask, alibi_slopes, sinks, cu_seqlens_q, max_seqlen_q,
                                            max_seqlen_k, causal, window_left, window_right, softcap, dropout_p))
        return result

    def attention_bwd_impl(
        grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
        lse: Tensor, attn_mask: Optional[Tensor], alibi_slopes: Optional[Tensor], sinks: Optional[Tensor],
        cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], dropout_seed: Optional[Tensor],
        max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool, window_left: int,
        window_right: int, softcap: float, dropout_p: float, want_mask_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        (dq, dk, dv, dsinks, dmask), served = kernel_fallback.call(
            backend, backward_impl, fallback and fallback[1],
            (grad_out, grad_lse, q, k, v, out, lse, attn_mask, alibi_slopes, sinks, cu_seqlens_q, cu_seqlens_k,
             dropout_seed, max_seqlen_q, max_seqlen_k, scale, causal, window_left, window_right, softcap,
             dropout_p, want_mask_grad))
        if trace.enabled():
            _record(served, "bwd", describe(q, k, v, attn_mask, alibi_slopes, sinks, cu_seqlens_q, max_seqlen_q,
                                            max_seqlen_k, causal, window_left, window_right, softcap, dropout_p))
        acc = lse_dtype(q.dtype)
        dsinks = q.new_empty((0,), dtype=acc) if dsinks is None else dsinks.to(acc)
        dmask = q.new_empty((0,), dtype=acc) if dmask is None else dmask.to(acc)
        return dq, dk, dv, dsinks, dmask

    attention_fwd = torch.library.custom_op(f"mfa_hf::{backend}_attention_fwd", attention_fwd_impl,
                                            mutates_args=(), device_types=device_types)
    attention_fwd.register_fake(_fake_forward)
    if backward_op is None:
        attention_bwd = torch.library.custom_op(f"mfa_hf::{backend}_attention_bwd", attention_bwd_impl,
                                                mutates_args=(), device_types=device_types)
        attention_bwd.register_fake(_fake_backward)
    else:
        attention_bwd = backward_op

    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask, alibi_slopes, sinks, cu_q, cu_k, seed = inputs[:9]
        ctx.scalars = inputs[9:]
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, alibi_slopes, sinks, cu_q, cu_k, seed)
        ctx.mask_dtype = None if attn_mask is None else attn_mask.dtype
        ctx.sinks_dtype = None if sinks is None else sinks.dtype

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, attn_mask, alibi_slopes, sinks, cu_q, cu_k, seed = ctx.saved_tensors
        want_mask_grad = bool(ctx.needs_input_grad[3]) and ctx.mask_dtype != torch.bool
        dq, dk, dv, dsinks, dmask = attention_bwd(
            grad_out.contiguous(), grad_lse, q, k, v, out, lse, attn_mask, alibi_slopes, sinks, cu_q,
            cu_k, seed, *ctx.scalars, want_mask_grad)
        dsinks = dsinks.to(ctx.sinks_dtype) if ctx.needs_input_grad[5] else None
        dmask = dmask.to(ctx.mask_dtype) if want_mask_grad else None
        return (dq, dk, dv, dmask, None, dsinks) + (None,) * 11

    attention_fwd.register_autograd(backward, setup_context=setup_context)
    return AttentionOps(forward=EagerShortcut(attention_fwd, attention_fwd_impl), backward=attention_bwd)


def empty_result(q: Tensor, v: Tensor, sinks: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The answer for Lq == 0 or Lk == 0: zeros, with LSE -inf (or the sink logit)."""
    out, lse = _fake_forward(q, q, v)
    out = torch.zeros_like(out)
    if sinks is not None:
        lse = sinks.to(lse.dtype).reshape((-1, 1) if q.dim() == 3 else (1, -1, 1)).expand(lse.shape).clone()
    else:
        lse = torch.full_like(lse, -math.inf)
    return out, lse


def empty_grads(q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor], grad_lse: Optional[Tensor],
                mask_shape=None):
    """Gradients for Lq == 0 or Lk == 0: zeros, except the sinks'. A row that sees no key has
    out = 0 and lse = its sink logit, so d(lse)/d(sink) = 1: dsinks[h] sums grad_lse over head h's rows.
    mask_shape: the additive mask's shape when its gradient is wanted (zeros), else None."""
    dsinks = None
    if sinks is not None:
        dsinks = torch.zeros(sinks.shape, dtype=lse_dtype(q.dtype), device=q.device)
        if grad_lse is not None and grad_lse.numel():
            dsinks += grad_lse.sum(dim=-1 if grad_lse.dim() == 2 else (0, 2)).to(dsinks.dtype)
    dmask = None if mask_shape is None else torch.zeros(mask_shape, dtype=lse_dtype(q.dtype), device=q.device)
    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dsinks, dmask


# ----------------------------------------------------------------------------------------------
# Decode over a (possibly quantized) KV cache: one backend-neutral schema for every backend.


def _fake_decode(q, k_codes, k_scales, v_codes, v_scales, seqlens_k, cache_batch_idx, alibi_slopes, sinks,
                 k_format, v_format, *_options):
    batch, lq, heads_q, _ = q.shape
    dim_v = kv_formats.spec(v_format).logical_dim(v_codes.shape[-1])
    out = q.new_empty((batch, lq, heads_q, dim_v))
    return out, q.new_empty((batch, heads_q, lq), dtype=lse_dtype(q.dtype))


def define_decode_op(backend: str, decode_impl: Callable, device_types=None,
                     fallback: Optional[Fallback] = None) -> EagerShortcut:
    """Register mfa_hf::{backend}_decode: attention of q over each sequence's valid cache prefix.

    q (B, Lq, Hq, D); k_codes (Bc, Smax, Hkv, Dk) and v_codes (Bc, Smax, Hkv, Dvc) are either the
    cache itself (format "none", scales None) or the codes of a QuantizedKV (mfa_hf/quant.py) with
    their float32 scales, broadcastable to (Bc, Smax, Hkv, D // group_size). seqlens_k (B,): keys
    visible to row b (new tokens included); cache_batch_idx (B,) or None maps rows to cache rows.
    Causal/window align bottom-right on seqlens_k[b]. num_splits 0 lets the backend choose.
    decode_impl takes the same arguments and returns (out (B, Lq, Hq, Dv), lse (B, Hq, Lq)).
    Forward only: quantized caches serve inference. fallback: as in define_attention_ops.
    """

    def decode(
        q: Tensor, k_codes: Tensor, k_scales: Optional[Tensor], v_codes: Tensor, v_scales: Optional[Tensor],
        seqlens_k: Tensor, cache_batch_idx: Optional[Tensor], alibi_slopes: Optional[Tensor],
        sinks: Optional[Tensor], k_format: str, v_format: str, k_group_size: int, v_group_size: int,
        scale: float, causal: bool, window_left: int, window_right: int, softcap: float, num_splits: int,
    ) -> tuple[Tensor, Tensor]:
        result, served = kernel_fallback.call(
            backend, decode_impl, fallback,
            (q, k_codes, k_scales, v_codes, v_scales, seqlens_k, cache_batch_idx, alibi_slopes, sinks, k_format,
             v_format, k_group_size, v_group_size, scale, causal, window_left, window_right, softcap, num_splits))
        if trace.enabled():
            trace.record(served, "decode", q.dtype, q.shape[-1], q.shape[1], k_codes.shape[1],
                         _decode_flags(q, k_codes, k_format, v_format, causal, window_left, window_right,
                                       softcap, alibi_slopes, sinks))
        return result

    op = torch.library.custom_op(f"mfa_hf::{backend}_decode", decode, mutates_args=(), device_types=device_types)
    op.register_fake(_fake_decode)
    return EagerShortcut(op, decode)


def _decode_flags(q, k_codes, k_format, v_format, causal, window_left, window_right, softcap, alibi, sinks):
    parts = ["kvcache"]
    if k_format != "none" or v_format != "none":
        parts.append(f"kv={k_format}" if k_format == v_format else f"kv={k_format}+{v_format}")
    if causal:
        parts.append("causal")
    if (window_left, window_right) != (-1, -1):
        parts.append(f"window={window_left},{window_right}")
    for on, name in ((softcap > 0, "softcap"), (alibi is not None, "alibi"), (sinks is not None, "sinks"),
                     (q.shape[2] != k_codes.shape[2], f"gqa={q.shape[2] // k_codes.shape[2]}")):
        if on:
            parts.append(name)
    return " ".join(parts)


def define_append_op(backend: str, append_impl: Callable, device_types=None,
                     fallback: Optional[Fallback] = None) -> Callable:
    """Register mfa_hf::{backend}_kvcache_append: write new tokens into a cache in place, quantizing
    on write when the cache is quantized (a backend's own kernel instead of the generic append).

    codes (Bc, Smax, Hkv, Dc): the plain cache (format "none") or a QuantizedKV's codes; scales: its
    float32 scales (an empty tensor for plain caches, never written then). new (B, Lnew, Hkv, D) goes
    to positions cache_seqlens[b] .. + Lnew - 1 of cache row cache_batch_idx[b] (or b). The caller
    has validated everything: the op cannot fail half-way (a kernel that cannot be built or launched
    hands the whole write to `fallback`, which rewrites every element).
    """

    @torch.library.custom_op(f"mfa_hf::{backend}_kvcache_append", mutates_args=("codes", "scales"),
                             device_types=device_types)
    def append(codes: Tensor, scales: Tensor, new: Tensor, cache_seqlens: Tensor,
               cache_batch_idx: Optional[Tensor], format: str, group_size: int) -> None:
        _, served = kernel_fallback.call(backend, append_impl, fallback,
                                         (codes, scales, new, cache_seqlens, cache_batch_idx, format, group_size))
        if trace.enabled():
            trace.record(served, "append", new.dtype, new.shape[-1], new.shape[1], codes.shape[1],
                         "kvcache" if format == "none" else f"kvcache kv={format}")

    @append.register_fake
    def _(codes, scales, new, cache_seqlens, cache_batch_idx, format, group_size):
        return None

    return append
