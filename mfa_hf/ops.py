"""The custom-op boundary: every backend's calls become torch.library custom ops here.

A validated call (kernels/contract.py) is flattened into the op schema exactly once, here, and rebuilt
inside the op; the backend only ever sees call objects. Each backend gets mfa_hf::<name>_attention_fwd
and _bwd (shared fake functions, registered autograd), <name>_decode, and <name>_kvcache_append when it
has its own append kernel, so torch.compile(fullgraph=True) sees opaque ops and no graph breaks.

Plain eager calls skip the dispatcher (`plain_eager`): the implementation runs directly on the call.
"""

# No `from __future__ import annotations`: custom_op infers the schema from real annotations.
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
import torch.autograd.forward_ad as _forward_ad

from . import kernel_fallback, kv_formats, op_vmap, trace
from .kernel_fallback import Fallback
from .kernels.contract import AppendCall, AttentionCall, Backend, CacheSide, DecodeCall, Gradients
from .kernels.launch import lse_dtype, output_shapes
from .kernels.merge import decode_with_residual
from .problem import AttentionProblem, MaskKind


def plain_eager(args, autograd: bool = False) -> bool:
    """Whether calling an op's implementation directly is the same as calling the op.

    True in plain eager code: not compiling or tracing (fake tensors and make_fx run under a dispatch
    mode), no functorch transform (vmap, grad), no tensor subclass, and no autograd graph to record.
    The dispatcher costs ~18 µs of host time per call on a fast x86 core and ~56 µs on the H100
    machine's host (benchmarks/triton/host_overhead.py), paid by every layer of every decode step.
    autograd=True allows a graph to record (the caller records it itself: EagerAutograd).
    """
    if torch.compiler.is_compiling():  # checked first: dynamo folds it and traces nothing below
        return False
    if forward_ad_active():
        refuse_tangents(args)
        return False
    if not eager_context():
        return False
    grad = torch.is_grad_enabled() and not autograd
    for arg in args:
        kind = type(arg)
        if kind is Tensor or kind is torch.nn.Parameter:
            if grad and arg.requires_grad:
                return False
        elif kind not in _SCALARS and isinstance(arg, Tensor):  # a subclass: FakeTensor, DTensor, ...
            return False
    return True


_SCALARS = frozenset((int, float, bool, str, type(None)))


def forward_ad_active() -> bool:
    """Inside torch.autograd.forward_ad.dual_level(), where a tensor may carry a tangent that nothing about its
    type shows (a module attribute read: free on every call)."""
    return _forward_ad._current_level >= 0


def refuse_tangents(args) -> None:
    """Forward-mode AD is refused by name: a kernel's output carries no tangent, and a custom op without a
    forward-mode rule dropped it too, silently (a zero tangent)."""
    for arg in args:
        if isinstance(arg, Tensor) and _forward_ad.unpack_dual(arg).tangent is not None:
            no_forward_mode()


def no_forward_mode(*_):
    raise NotImplementedError(
        "mfa_hf attention has no forward-mode AD (a tensor carries a tangent: torch.autograd.forward_ad dual "
        "tensors, torch.func.jvp, jacfwd, hessian); use reverse mode (backward, torch.func.grad, vjp, jacrev)")


def eager_context() -> bool:
    """plain_eager's checks of the context alone (no dispatch mode, no functorch transform; not compiling is the
    caller's): for a call whose tensors and grad mode its memo key already proved plain."""
    return not (torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active())


def under_transforms() -> bool:
    """Whether an eager call runs under a functorch transform (torch.func.grad, vjp, vmap). Not while
    compiling: dynamo traces transforms itself and took the op there (compiled vmap worked; dynamo 2.13 fails
    on the transform-form autograd.Function's context)."""
    return torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling()


class EagerShortcut:
    """A registered custom op taking a call object: plain eager calls (plain_eager) run the
    implementation on the call directly, and eager calls that record autograd its autograd.Function when
    it has one (the op's own setup_context and backward); compiled, traced and transformed calls go through
    `op` with the call's flat arguments (fake, autograd, opcheck)."""

    def __init__(self, op: Callable, impl: Callable, replayer: Optional[Callable] = None,
                 autograd: Optional[type] = None, transformed: Optional[type] = None):
        self.op = op
        self.impl = impl
        self._replayer = replayer
        self._autograd = autograd  # the op's autograd as a torch.autograd.Function, for plain eager calls
        self._transformed = transformed  # the same autograd in functorch's form, for calls under a transform

    @property
    def replays(self) -> bool:
        """Whether the backend can replay a launch at all."""
        return self._replayer is not None

    def replay_for(self, call) -> Optional[Callable]:
        """The backend's replay of the launch `self(call)` just made (kernels/contract.py, forward_replay), for
        later calls of exactly its kind; None when the backend has none or this call went through the op."""
        if self._replayer is None or not plain_eager(call.op_args()):
            return None
        return self._replayer(call)

    def __call__(self, call, problem: Optional[AttentionProblem] = None):
        args = call.op_args()
        if plain_eager(args):
            return self.impl(call, problem)
        if self._autograd is not None and plain_eager(args, autograd=True):
            return self._autograd.apply(*args)
        if self._transformed is not None and under_transforms():
            return self._transformed.apply(*args)
        return self.op(*args)


@dataclass(frozen=True)
class BackendOps:
    """A backend's registered ops."""

    backend: Backend
    forward: EagerShortcut  # the forward op (autograd registered), with its eager shortcut
    backward: Callable  # the backward op (flat arguments)
    decode: EagerShortcut
    append: Optional[Callable]  # AppendCall -> None, or None: the generic torch write


def describe(call: AttentionCall, kv_format: str = "none", needs_grad: bool = False) -> AttentionProblem:
    """The AttentionProblem of a validated call (no checks here: validation did them)."""
    q, o = call.q, call.options
    mask = MaskKind(call.mask_kind)
    return AttentionProblem(
        device_type=q.device.type, dtype=q.dtype, batch=call.batch, seqlen_q=call.seqlen_q,
        seqlen_k=call.seqlen_k, heads_q=call.heads_q, heads_kv=call.heads_kv, head_dim_qk=q.shape[-1],
        head_dim_v=call.v.shape[-1], causal=o.causal, window=o.window, softcap=o.softcap,
        has_alibi=call.alibi_slopes is not None, has_sinks=call.sinks is not None, mask=mask,
        varlen=call.varlen, dropout_p=o.dropout_p, kv_format=kv_format, needs_grad=needs_grad,
        largest_span=_largest_span(q, call.k, call.v, call.attn_mask),
        bf16_backward=o.bf16_backward and needs_grad,
    )


def describe_decode(call: DecodeCall) -> AttentionProblem:
    """The AttentionProblem of a cache call (kv_format "none", "int8", or "k+v" when they differ)."""
    keys, values = call.keys, call.values
    kv_format = keys.format if keys.format == values.format else f"{keys.format}+{values.format}"
    dense = AttentionCall(call.q, keys.codes, values.codes, call.options, alibi_slopes=call.alibi_slopes,
                          sinks=call.sinks)
    problem = describe(dense, kv_format)
    dim_v = kv_formats.spec(values.format).logical_dim(values.codes.shape[-1])
    return AttentionProblem(**{**problem.__dict__, "head_dim_qk": call.q.shape[-1], "head_dim_v": dim_v})


def _span(t, first: int) -> int:
    """1 + the largest element offset a tensor's strides reach from its data pointer over its dims from
    `first` on (dense tensors skip the batch: kernels offset batches in 64 bits); 0 when empty. It runs
    on every call: contiguous tensors take a shortcut, the rest a plain loop."""
    if t is None:
        return 0
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


def _fake_forward(q, k, v, *_args):
    out_shape, lse_shape = output_shapes(q, v)
    return q.new_empty(out_shape), q.new_empty(lse_shape, dtype=lse_dtype(q.dtype))


def _fake_backward(grad_out, grad_lse, out, lse, want_mask_grad, q, k, v, attn_mask, alibi_slopes, sinks, *_rest):
    dsinks = q.new_empty(sinks.shape if sinks is not None else (0,), dtype=lse_dtype(q.dtype))
    dmask = q.new_empty(attn_mask.shape if want_mask_grad else (0,), dtype=lse_dtype(q.dtype))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks, dmask


def refuse_bf16_backward(backend: Backend) -> None:
    """bf16_backward=True under autograd, for a backend whose backward does not implement it."""
    if not backend.bf16_backward:
        raise NotImplementedError(
            f"bf16_backward=True: the {backend.name} backend's backward has no bfloat16 mode (it computes in "
            f"float32). Pass bf16_backward=False, or set MFA_BACKEND=torch (or triton on cuda), whose backward "
            f"implements it.")


def _fallback(backend: Backend, method: str, registry: Callable[[str], Backend]) -> Optional[Fallback]:
    if backend.fallback is None:
        return None
    other = registry(backend.fallback)
    return Fallback(other.name, getattr(other, method))


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("mfa_hf attention has no double backward (a gradient of its gradients: "
                              "torch.func.hessian, jacrev of grad, create_graph=True); its backward is one kernel")


def _under_transforms(op: Callable, name: str, backward: Callable = _no_double_backward,
                      setup_context: Optional[Callable] = None) -> type:
    """An autograd.Function calling `op`, for calls under a functorch transform (torch.func.grad, vjp, jacrev,
    vmap): there every custom op's own autograd wrapper (torch.library's generated Function, which has no
    separate setup_context) raises torch's functorch error, even where no gradient of it is needed. Its forward
    calls the op itself, so vmap (generate_vmap_rule) batches the op as it would without us. `backward` and
    `setup_context` are the op's own (the attention forward's), or by default a refusal by name and nothing
    saved (the attention backward's op, the decode)."""
    return type(f"{name}_transformed", (torch.autograd.Function,), {
        "forward": staticmethod(lambda *args: op(*args)), "setup_context": staticmethod(setup_context or _no_context),
        "backward": staticmethod(backward), "jvp": staticmethod(no_forward_mode), "generate_vmap_rule": True})


def define_ops(backend: Backend, registry: Callable[[str], Backend]) -> BackendOps:
    """Register the custom ops of `backend`; registry(name) gives another backend (its fallback)."""
    name, devices = backend.name, backend.device_types
    forward_fallback = _fallback(backend, "forward", registry)
    backward_fallback = _fallback(backend, "backward", registry)

    def forward_call(call: AttentionCall, problem: Optional[AttentionProblem]) -> tuple:
        result, served = kernel_fallback.call(name, backend.forward, forward_fallback, (call,))
        if trace.enabled():
            _record(served, "fwd", problem or describe(call))
        return result

    def attention_fwd(
        q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], alibi_slopes: Optional[Tensor],
        sinks: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
        dropout_seed: Optional[Tensor], scale: float, window_left: int, window_right: int, softcap: float,
        dropout_p: float, max_seqlen_q: int, max_seqlen_k: int, bf16_backward: bool = False,
    ) -> tuple[Tensor, Tensor]:
        return forward_call(AttentionCall.from_op_args(
            (q, k, v, attn_mask, alibi_slopes, sinks, cu_seqlens_q, cu_seqlens_k, dropout_seed, scale,
             window_left, window_right, softcap, dropout_p, max_seqlen_q, max_seqlen_k, bf16_backward)), None)

    def attention_bwd(
        grad_out: Tensor, grad_lse: Optional[Tensor], out: Tensor, lse: Tensor, want_mask_grad: bool,
        q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], alibi_slopes: Optional[Tensor],
        sinks: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
        dropout_seed: Optional[Tensor], scale: float, window_left: int, window_right: int, softcap: float,
        dropout_p: float, max_seqlen_q: int, max_seqlen_k: int, bf16_backward: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        call = AttentionCall.from_op_args(
            (q, k, v, attn_mask, alibi_slopes, sinks, cu_seqlens_q, cu_seqlens_k, dropout_seed, scale,
             window_left, window_right, softcap, dropout_p, max_seqlen_q, max_seqlen_k, bf16_backward))
        grads = Gradients(grad_out, grad_lse, out, lse, want_mask_grad)
        (dq, dk, dv, dsinks, dmask), served = kernel_fallback.call(name, backend.backward, backward_fallback,
                                                                   (call, grads))
        if trace.enabled():
            _record(served, "bwd", describe(call))
        acc = lse_dtype(q.dtype)
        dsinks = q.new_empty((0,), dtype=acc) if dsinks is None else dsinks.to(acc)
        dmask = q.new_empty((0,), dtype=acc) if dmask is None else dmask.to(acc)
        return dq, dk, dv, dsinks, dmask

    fwd_op = torch.library.custom_op(f"mfa_hf::{name}_attention_fwd", attention_fwd, mutates_args=(),
                                     device_types=devices)
    fwd_op.register_fake(_fake_forward)
    fwd_op.register_vmap(op_vmap.forward_rule(fwd_op))
    bwd_op = torch.library.custom_op(f"mfa_hf::{name}_attention_bwd", attention_bwd, mutates_args=(),
                                     device_types=devices)
    bwd_op.register_fake(_fake_backward)
    bwd_op.register_vmap(op_vmap.backward_rule(bwd_op))
    # create_graph=True records the backward op: a gradient of its gradients is refused by name, not by torch's
    # "no autograd formula" (whose advice, to register one, was for us)
    bwd_op.register_autograd(_no_double_backward, setup_context=_no_context)

    def setup_context(ctx, inputs, output):
        # An output nobody used (usually the LSE) reaches backward as None, not as zeros: no fill kernel, and the
        # backward skips its term.
        ctx.set_materialize_grads(False)
        ctx.scalars = inputs[9:]
        if ctx.scalars[-1]:  # bf16_backward: refused here, at the forward, by a backend that ignores it
            refuse_bf16_backward(backend)
        out, lse = output
        ctx.save_for_backward(*inputs[:9], out, lse)
        mask, sinks = inputs[3], inputs[5]
        ctx.mask_dtype = None if mask is None else mask.dtype
        ctx.sinks_dtype = None if sinks is None else sinks.dtype

    def backward(ctx, grad_out, grad_lse):
        *tensors, out, lse = ctx.saved_tensors
        if grad_out is None:  # only the LSE was used
            grad_out = torch.zeros_like(out)
        want_mask_grad = bool(ctx.needs_input_grad[3]) and ctx.mask_dtype != torch.bool
        args = (grad_out.contiguous(), grad_lse, out, lse, want_mask_grad, *tensors, *ctx.scalars)
        # The implementation directly where that is the same as the op (eager, no graph of the backward to record)
        if plain_eager(args):
            dq, dk, dv, dsinks, dmask = attention_bwd(*args)
        elif under_transforms():
            dq, dk, dv, dsinks, dmask = TransformedBackward.apply(*args)
        else:
            dq, dk, dv, dsinks, dmask = bwd_op(*args)
        dsinks = dsinks.to(ctx.sinks_dtype) if ctx.needs_input_grad[5] else None
        dmask = dmask.to(ctx.mask_dtype) if want_mask_grad else None
        return (dq, dk, dv, dmask, None, dsinks) + (None,) * 11

    fwd_op.register_autograd(backward, setup_context=setup_context)
    TransformedBackward = _under_transforms(bwd_op, f"{name}_attention_bwd")

    def eager_forward(ctx, *args):  # ctx in forward, not a setup_context: apply() would bind a signature per call
        output = forward_call(AttentionCall.from_op_args(args), None)
        setup_context(ctx, args, output)
        return output

    # The forward op's autograd (the same setup_context and backward) for plain eager calls that record a graph:
    # the op's own autograd wrapper costs ~100 µs of host time per call more (dispatcher round trips and
    # torch.library's per-call schema walk), paid by every layer of every training step. Named for the backend,
    # so that a graph shows <name>_attentionBackward.
    EagerAutograd = type(f"{name}_attention", (torch.autograd.Function,), {
        "forward": staticmethod(eager_forward), "backward": staticmethod(backward)})
    # The same autograd for calls under a functorch transform (torch.func.grad raised through the op's own)
    transformed = _under_transforms(fwd_op, f"{name}_attention", backward, setup_context)
    forward_ops = EagerShortcut(fwd_op, forward_call, getattr(backend, "forward_replay", None), EagerAutograd,
                                transformed)
    return BackendOps(backend, forward_ops, bwd_op,
                      _define_decode(backend, registry), _define_append(backend, registry))


# ----------------------------------------------------------------------------------------------
# Decode over a (possibly quantized) KV cache: one backend-neutral schema for every backend.


def _fake_decode(q, k_codes, k_scales, v_codes, v_scales, seqlens_k, cache_batch_idx, alibi_slopes, sinks,
                 k_format, v_format, *_options, residual_keys=None, residual_values=None, residual_lengths=None):
    batch, lq, heads_q, _ = q.shape
    dim_v = kv_formats.spec(v_format).logical_dim(v_codes.shape[-1])
    out = q.new_empty((batch, lq, heads_q, dim_v))
    return out, q.new_empty((batch, heads_q, lq), dtype=lse_dtype(q.dtype))


def _define_decode(backend: Backend, registry) -> EagerShortcut:
    """mfa_hf::{name}_decode: DecodeCall -> (out (B, Lq, Hq, Dv), lse (B, Hq, Lq)). Forward only:
    quantized caches serve inference."""
    name = backend.name
    fallback = _fallback(backend, "decode", registry)

    def one_part(call: DecodeCall) -> tuple:
        result, served = kernel_fallback.call(name, backend.decode, fallback, (call,))
        if trace.enabled():
            trace.record(served, "decode", call.q.dtype, call.q.shape[-1], call.q.shape[1],
                         call.keys.codes.shape[1], _decode_flags(call))
        return result

    def decode_call(call: DecodeCall, problem: Optional[AttentionProblem]) -> tuple:
        if call.has_residual:  # two parts, merged in the kernels package
            return decode_with_residual(one_part, call)
        return one_part(call)

    def decode(
        q: Tensor, k_codes: Tensor, k_scales: Optional[Tensor], v_codes: Tensor, v_scales: Optional[Tensor],
        seqlens_k: Tensor, cache_batch_idx: Optional[Tensor], alibi_slopes: Optional[Tensor],
        sinks: Optional[Tensor], k_format: str, v_format: str, k_group_size: int, v_group_size: int,
        scale: float, window_left: int, window_right: int, softcap: float, num_splits: int,
        residual_keys: Optional[Tensor] = None, residual_values: Optional[Tensor] = None,
        residual_lengths: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        return decode_call(DecodeCall.from_op_args(
            (q, k_codes, k_scales, v_codes, v_scales, seqlens_k, cache_batch_idx, alibi_slopes, sinks, k_format,
             v_format, k_group_size, v_group_size, scale, window_left, window_right, softcap, num_splits,
             residual_keys, residual_values, residual_lengths)), None)

    op = torch.library.custom_op(f"mfa_hf::{name}_decode", decode, mutates_args=(),
                                 device_types=backend.device_types)
    op.register_fake(_fake_decode)
    op.register_vmap(op_vmap.decode_rule(op))
    op.register_autograd(_decode_backward, setup_context=_no_context)
    # Under a functorch transform: the same refusal when a gradient reaches it, vmap batching the op
    return EagerShortcut(op, decode_call, getattr(backend, "decode_replay", None),
                         transformed=_under_transforms(op, f"{name}_decode", _decode_backward))


DECODE_HAS_NO_BACKWARD = (
    "q, sinks: expected no backward through a decode (flash_attn_with_kvcache, attention over quantized K/V, a "
    "model's cached decode step), which computes no gradients, got a backward through one; call it under "
    "torch.no_grad(), or train with flash_attn_func / flash_attention over plain K/V")


def _no_context(ctx, inputs, output) -> None:
    return None


APPEND_HAS_NO_BACKWARD = (
    "k, v: expected no backward through the new tokens of flash_attn_with_kvcache, which the append copies into the "
    "cache (no gradient flows through a cache), got a backward that needs their gradients; append under "
    "torch.no_grad() or pass k.detach() and v.detach(), or train with flash_attn_func over plain K/V")


class _RefusedBackward(torch.autograd.Function):
    """Outputs that depend on inputs no graph reaches (the new tokens an append copied): a backward through them
    is refused by name, instead of their gradients staying None without a word."""

    @staticmethod
    def forward(ctx, count, *tensors):
        return tuple(t.view_as(t) for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(APPEND_HAS_NO_BACKWARD)


def refusing_backward(found, *inputs):
    """found (a tensor, or a tuple of them), attached to `inputs` by a node that refuses a backward."""
    outputs = found if isinstance(found, tuple) else (found,)
    attached = _RefusedBackward.apply(len(outputs), *outputs, *inputs)
    return attached if isinstance(found, tuple) else attached[0]


def _decode_backward(ctx, grad_out, grad_lse):
    """The decode has no gradient: said when a backward reaches it (the forward stays served with grad enabled,
    as inference code often runs without no_grad), not as torch's 'no autograd formula' error."""
    raise RuntimeError(DECODE_HAS_NO_BACKWARD)


def _decode_flags(call: DecodeCall) -> str:
    parts = ["kvcache"]
    k_format, v_format = call.keys.format, call.values.format
    if k_format != "none" or v_format != "none":
        parts.append(f"kv={k_format}" if k_format == v_format else f"kv={k_format}+{v_format}")
    window = call.options.window
    if window == (-1, 0):
        parts.append("causal")
    elif window != (-1, -1):
        parts.append(f"window={window[0]},{window[1]}")
    for on, flag in ((call.options.softcap > 0, "softcap"), (call.alibi_slopes is not None, "alibi"),
                     (call.sinks is not None, "sinks"),
                     (call.q.shape[2] != call.keys.codes.shape[2],
                      f"gqa={call.q.shape[2] // max(1, call.keys.codes.shape[2])}")):
        if on:
            parts.append(flag)
    return " ".join(parts)


def _define_append(backend: Backend, registry) -> Optional[Callable]:
    """mfa_hf::{name}_kvcache_append (the backend's own quantize-on-write kernel), or None."""
    if backend.append is None:
        return None
    name = backend.name
    fallback = None
    if backend.fallback is not None:
        fallback = Fallback("generic", _generic_append)

    @torch.library.custom_op(f"mfa_hf::{name}_kvcache_append", mutates_args=("codes", "scales"),
                             device_types=backend.device_types)
    def append_op(codes: Tensor, scales: Tensor, new: Tensor, cache_seqlens: Tensor,
                  cache_batch_idx: Optional[Tensor], format: str, group_size: int) -> None:
        call = AppendCall(CacheSide(codes, scales, format, group_size), new, cache_seqlens, cache_batch_idx)
        _, served = kernel_fallback.call(name, backend.append, fallback, (call,))
        if trace.enabled():
            trace.record(served, "append", new.dtype, new.shape[-1], new.shape[1], codes.shape[1],
                         "kvcache" if format == "none" else f"kvcache kv={format}")

    @append_op.register_fake
    def _(codes, scales, new, cache_seqlens, cache_batch_idx, format, group_size):
        return None

    def append(call: AppendCall) -> None:
        cache = call.cache
        append_op(cache.codes, cache.scales, call.new, call.cache_seqlens, call.cache_batch_idx, cache.format,
                  cache.group_size)

    append.op = append_op
    return append


def _generic_append(call: AppendCall) -> None:
    """The write without a backend kernel (mfa_hf.kvcache's generic append): where the kernel cannot be built."""
    from .kvcache import append_generic  # local: kvcache imports this module
    from .quant import QuantizedKV

    cache = call.cache
    target = cache.codes if cache.format == "none" else QuantizedKV(cache.codes, cache.scales, cache.format,
                                                                    cache.group_size, call.new.dtype)
    append_generic(target, call.new, call.cache_seqlens, call.cache_batch_idx)
