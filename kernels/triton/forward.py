"""Launching the triton forward kernel (forward_kernel.py): outputs, strides, grid, constexprs.

No host synchronization: everything passed is a shape, a stride, a Python scalar or a device tensor
(the dropout seed is read on the host only when dropout is on).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..contract import AttentionCall
from ..environment import reader
from ..launch import BoundedMemo, contiguous_strides, empty_result, new_output

from . import forward_kernel, tma
from .binding import alibi_args, common_meta, dropout_args, mask_args, on_tensors_device, strides4
from .blocks import cdiv, forward_blocks
from .direct_launch import DirectLauncher, tensor_classes

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
_generation = [0]  # bumped by forget_plans: a replay made before then declines
_read_switches = reader("MFA_TRITON_DIRECT_LAUNCH", "MFA_TRITON_TMA")  # what else changes a launch


def forget_plans() -> None:
    """Drop every launch plan and the kernels launched by them, the backward's too: a benchmark that swaps a
    block table (blocks.py) calls this."""
    from . import backward  # backward.py imports this module

    _plans.clear()
    _FORWARD.forget()
    backward.forget_plans()
    _generation[0] += 1


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
    out_strides, lse_strides_ = contiguous_strides(out_shape), contiguous_strides(lse_shape)
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


def launch_key(call: AttentionCall) -> tuple:
    """What a forward launch depends on: shapes, strides, dtypes, lengths, window and feature flags, never a
    tensor's values (the backward's key extends it)."""
    q, k, v, o = call.q, call.k, call.v, call.options
    return (q.device, q.dtype, q.shape, q.stride(), k.dtype, k.shape, k.stride(), v.dtype, v.shape, v.stride(),
            _strided(call.attn_mask), _strided(call.alibi_slopes), call.sinks is None, _strided(call.cu_seqlens_q),
            _strided(call.cu_seqlens_k), call.seqlen_q, call.seqlen_k, o.causal, o.window_left, o.window_right,
            o.softcap > 0, o.dropout_p > 0, (k.data_ptr() | v.data_ptr()) & 15)  # TMA needs 16-byte aligned K and V


@on_tensors_device
def forward(call: AttentionCall):
    """(out, lse) (kernels/contract.py). Per call: the launch key (shapes, strides, dtypes, lengths, windows,
    flags; never a tensor's values) and its remembered _Plan, the two allocations, the launch."""
    q, k, v, attn_mask, alibi_slopes, sinks = call.q, call.k, call.v, call.attn_mask, call.alibi_slopes, call.sinks
    cu_seqlens_q, cu_seqlens_k, o = call.cu_seqlens_q, call.cu_seqlens_k, call.options
    lq, lk = call.seqlen_q, call.seqlen_k
    if q.shape[0] == 0 or lq == 0 or (cu_seqlens_q is None and lk == 0):
        return empty_result(q, v, sinks)
    key = launch_key(call)
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


def launches_unchanged():
    """A function telling whether what a launch made now depends on beyond its key is still the same: the plans
    not forgotten since (forget_plans) and the launch switches in the environment. For replays."""
    generation, switches = _generation[0], _read_switches()
    return lambda: _generation[0] == generation and _read_switches() == switches


def replay(call: AttentionCall):
    """After `forward(call)` ran: a function (q, k, v) -> (out, lse) that launches the same compiled kernel with
    the same plan for later calls of exactly this kind, with no key, plan or launcher lookup; or None where there
    is none (only plain calls on CUDA, with 16-byte aligned q, k and v, get one).

    The caller guarantees the kind: the same shapes, strides, dtypes, devices and options, no helper tensors,
    and plain eager code (mfa_hf/repeat_calls.py, api.py). The replay checks, per call, what that kind does not
    hold and the launch depends on: 16-byte aligned q, k and v (Triton's and TMA's specialization), the current
    CUDA device (Triton launches on it), the plans not forgotten since, and the launch switches in the
    environment. When one of them differs it returns None, and the caller takes the full path.
    """
    q, k, v, o = call.q, call.k, call.v, call.options
    if (call.attn_mask is not None or call.alibi_slopes is not None or call.sinks is not None or call.varlen
            or o.dropout_p > 0 or q.device.type != "cuda" or (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15
            or q.device.index != torch.cuda.current_device()):
        return None
    key = launch_key(call)
    plan = _plans.get(key)
    if plan is None:
        return None
    out_dtype, device, index = q.dtype, q.device, q.device.index
    # The argument kinds forward() launched with: q, k, v, out, lse, then q for each absent helper tensor.
    classes = tensor_classes((q, k, v)) + ((out_dtype, True), (torch.float32, True)) + ((q.dtype, True),) * 5
    found = _FORWARD.runner(index, plan.grid, key, classes)
    if found is None:
        return None
    run, tail = found
    rest = (*plan.ints, float(o.scale), float(o.softcap), *plan.window, 0, 0, 1.0, *tail)
    out_shape, lse_shape, uses_tma = plan.out_shape, plan.lse_shape, plan.options["TMA"]
    unchanged, current_device = launches_unchanged(), torch.cuda.current_device

    def launch(q, k, v):
        if (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15 or current_device() != index or not unchanged():
            return None
        out = new_output(out_shape, out_dtype, device)
        lse = new_output(lse_shape, torch.float32, device)
        try:
            run(q, k, v, out, lse, q, q, q, q, q, *rest)
        except RuntimeError as error:
            if not (uses_tma and tma.missing_allocator(error)):
                raise
            return None  # nothing ran: the full path gives this thread an allocator (tma.py)
        return out, lse

    return launch
