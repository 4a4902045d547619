"""Public attention functions, with FlashAttention-2's names and conventions.

`flash_attn_func` and `flash_attn_varlen_func` take (B, S, H, D) / packed (T, H, D) tensors like
FlashAttention-2; `flash_attention` and `flash_attention_chunked` take (B, H, S, D) like the
`mps-flash-attn` package. All of them validate once, pick a backend, and call its custom op, which
has a registered backward. Semantics: kernels/reference.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import dispatch, helper_tensors, native, ops, repeat_calls, routes, scalars, trace
from .decisions import Decisions
from .kernels.dropout import new_seed
from .kernels.contract import AttentionCall, Options, fold_causal
from .ops import describe
from .quant import QuantizedKV
from .problem import (
    NO_WINDOW,
    AttentionProblem,
    check_alibi,
    check_bf16_backward,
    check_cu_seqlens,
    check_dropout,
    check_mask,
    check_max_seqlen,
    check_qkv,
    check_rank,
    check_scale,
    check_sinks,
    check_softcap,
    check_window,
)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = NO_WINDOW,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
    *,
    attn_mask: torch.Tensor | None = None,
    dropout_seed: int | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    bf16_backward: bool = False,
):
    """Attention over q (B, Lq, Hq, D), k (B, Lk, Hkv, D), v (B, Lk, Hkv, Dv) -> (B, Lq, Hq, Dv).

    causal and window_size=(left, right) align bottom-right (query i sits on key i + Lk - Lq).
    softcap > 0 caps scores as softcap * tanh(s / softcap). alibi_slopes (Hq,) or (B, Hq) add
    -slope * |i + Lk - Lq - j|. sinks (Hq,) are per-head logits joining the softmax denominator.
    attn_mask (extension): bool (True = attend) or additive float, broadcastable to (B, Hq, Lq, Lk).
    dropout uses a counter-based RNG seeded by dropout_seed, or drawn from `generator`.
    deterministic is accepted for compatibility; every backend here is deterministic.
    return_lse=True returns (out, lse) with lse (B, Hq, Lq) float32.
    bf16_backward=True: the backward's matmuls take bfloat16 operands, summed in float32 (see flash_attention).
    k and v may be QuantizedKV (mfa_hf.quantize_kv; forward only, no attn_mask/dropout).
    """
    kind = None
    plain = attn_mask is None and alibi_slopes is None and sinks is None and not bf16_backward
    if plain and dropout_seed is None and generator is None:
        kind = repeat_calls.plain_kind(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, return_lse)
        known = _plain_decisions.get(kind) if kind is not None else None
        if known is not None:  # this kind of call was checked and routed before: only build it and launch
            replay = known.replay
            if replay is not None and not trace.enabled() and ops.eager_context():
                result = replay(q, k, v)
                if result is not None:
                    return result if return_lse else result[0]
            call = AttentionCall(q, k, v, known.options)
            result = _run(known, call, return_lse)
            if replay is not _NO_REPLAY:  # none yet, or one that declined (it may be stale: plans forgotten since)
                replay = _replay_for(known, call, return_lse)
                if replay is not None:
                    _plain_decisions[kind] = dataclasses.replace(known, replay=replay)
            return result
    return_lse = scalars.flag(return_lse, "return_lse")  # the memo path above took only a bool
    if _quantized(k, v):
        from .kvcache import attention_over_quantized  # local: the KV-cache module is not needed otherwise

        return attention_over_quantized(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks,
                                        return_lse, dropout_p, attn_mask)
    check_qkv(q, k, v, rank=4, layout="(B, S, H, D)")
    batch, lq, heads_q, _ = q.shape
    check_mask(attn_mask, batch, heads_q, lq, k.shape[1], q.device)
    check_alibi(alibi_slopes, batch, heads_q, q.device)
    call = validated_call(q, k, v, attn_mask=attn_mask, alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=dropout_p,
                          softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                          dropout_seed=dropout_seed, generator=generator, bf16_backward=bf16_backward)
    decision = _decide(call, return_lse)
    if kind is not None:
        _plain_decisions.keep(kind, decision)
    return _run(decision, call, return_lse)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = NO_WINDOW,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
    *,
    dropout_seed: int | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
):
    """Packed sequences: q (Tq, Hq, D), k/v (Tk, Hkv, D); sequence b is rows cu_seqlens[b]:[b+1].

    Each sequence is its own attention problem (causal/window align bottom-right within it).
    As in FlashAttention-2, sizes come from the shapes and max_seqlen_q/max_seqlen_k (at least the
    longest sequence), and the offsets' values are trusted on mps/cuda: nothing is read back from the
    device. CPU offsets are always checked; MFA_CHECK_VALUES=1 checks device ones too (a sync per call).
    Returns (Tq, Hq, Dv), and with return_lse also lse (Hq, Tq).
    """
    check_qkv(q, k, v, rank=3, layout="(T, H, D) packed by cu_seqlens")
    batch, offsets_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], None, q.device)
    _, offsets_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], batch, q.device)
    max_seqlen_q = check_max_seqlen(max_seqlen_q, "max_seqlen_q", offsets_q)
    max_seqlen_k = check_max_seqlen(max_seqlen_k, "max_seqlen_k", offsets_k)
    if offsets_q == [0, q.shape[0]] and offsets_k == [0, k.shape[0]]:
        # One sequence, its offsets read (CPU, or MFA_CHECK_VALUES=1): the dense problem of a batch of one, served
        # by the same route as flash_attn_func on it, so the two agree bitwise (varlen alone never routes natively).
        found = flash_attn_func(q[None], k[None], v[None], dropout_p, softmax_scale, causal, window_size, softcap,
                                alibi_slopes, sinks, deterministic, return_lse, dropout_seed=dropout_seed,
                                generator=generator)
        return (found[0][0], found[1][0]) if scalars.flag(return_lse, "return_lse") else found[0]
    check_alibi(alibi_slopes, batch, q.shape[1], q.device)
    call = validated_call(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                          max_seqlen_k=max_seqlen_k, alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=dropout_p,
                          softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                          dropout_seed=dropout_seed, generator=generator)
    return _attend(call, return_lse)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    window_size: int | tuple[int, int] | None = None,
    scale: float | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    *,
    dropout_seed: int | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    bf16_backward: bool = False,
):
    """Attention over (B, H, S, D) tensors, the call shape of the `mps-flash-attn` package.

    Same semantics as flash_attn_func (bottom-right causal). window_size: an int w with is_causal
    means the last w keys (the query's own included); an int without is_causal bounds the left side
    only (w - 1 keys before the query's own); a (left, right) pair is passed through. mps-flash-attn
    counts an int w as w keys *before* the query's own (w + 1 in all) and takes bool masks as True =
    masked out: docs/migrating.md, or torch.ops.mfa.flash_attention (register_custom_op), which keeps
    those meanings. Returns (B, H, Lq, Dv) (a transposed view of the kernel's (B, Lq, H, Dv) output: no copy).

    bf16_backward=True (training): the backward's five matmuls take bfloat16 operands (Q, K, V, dO, P, dS
    rounded to bfloat16) and sum in float32; gradients come out in the input dtype. The torch and triton
    backends implement it, metal refuses it; the speed-up and the measured error are in docs/migrating.md.
    """
    if not _quantized(k, v):  # QuantizedKV (quantize_kv(..., layout="bhsd")) is checked downstream
        check_rank(q, k, v, rank=4, layout="(B, H, S, D)")
    for name, side in (("k", k), ("v", v)):
        if isinstance(side, QuantizedKV) and not side.heads_first:
            raise ValueError(f"{name}: expected a (B, H, S, D) QuantizedKV (quantize_kv(..., layout='bhsd'), or "
                             f".transpose(1, 2) of a (B, S, H, D) one), got a (B, S, H, D) one")
    scale = None if scale is None else check_scale(scale, 1, "scale")
    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p, scale, is_causal,
        bhsd_window(window_size, is_causal), softcap, alibi_slopes, sinks, return_lse=return_lse,
        attn_mask=attn_mask, dropout_seed=dropout_seed, generator=generator, bf16_backward=bf16_backward,
    )
    if return_lse:
        return out[0].transpose(1, 2), out[1]
    return out.transpose(1, 2)


def _quantized(k, v) -> bool:
    return isinstance(k, QuantizedKV) or isinstance(v, QuantizedKV)


def bhsd_window(window_size, is_causal: bool) -> tuple[int, int]:
    """flash_attention's window: None (none), int (left span in keys, own key included) or a pair."""
    is_causal = scalars.flag(is_causal, "is_causal")
    if window_size is None:
        return NO_WINDOW
    if not isinstance(window_size, (tuple, list)):  # an int-like: numpy ints and 0-d int tensors too
        window_size = scalars.int_like(window_size, "window_size", "None, an int >= 1 (keys visible) or a pair",
                                       ValueError)
        if window_size < 1:
            raise ValueError(f"window_size: expected an int >= 1 (keys visible), got {window_size}")
        return (window_size - 1, 0) if is_causal else (window_size - 1, -1)
    return check_window(window_size)


def flash_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int = 8192,
    is_causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    window_size: int | tuple[int, int] | None = None,
    scale: float | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """flash_attention for very long inputs (100K+ tokens), in query chunks of `chunk_size` rows.

    Every backend is already O(N) in memory; chunking bounds the work of one kernel dispatch (long
    single dispatches can trip the GPU watchdog) and, for causal/windowed attention, hands each
    chunk only the keys it can see. Results equal flash_attention's; backward works through it.
    """
    from .chunked import chunked_attention  # local: keeps this module free of the chunk planner

    chunk_size = scalars.int_like(chunk_size, "chunk_size", "an int >= 1", error=ValueError)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    check_rank(q, k, v, rank=4, layout="(B, H, S, D)")
    window = bhsd_window(window_size, is_causal)
    scale = None if scale is None else check_scale(scale, 1, "scale")
    return chunked_attention(q, k, v, chunk_size, is_causal, attn_mask, window, scale, softcap, sinks,
                             alibi_slopes, return_lse)


# Plain calls (no mask, helper tensors or dropout) by kind -> their Decision (repeat_calls.py says what a kind is).
_plain_decisions = Decisions()


@dataclass(frozen=True)
class Decision:
    """How a validated call runs: the route, our backend when the route is not native, the problem
    (trace, backend), and the call's options (a repeated plain call reuses them)."""

    route: routes.Route
    backend: Optional[dispatch.Backend]
    problem: AttentionProblem
    options: Options
    # A plain kind's relaunch of its kernel (ops.EagerShortcut.replay_for, or native.replay on the native route),
    # made at its second call: None until then, _NO_REPLAY when there is none for it. A call the replay declines
    # takes the full path, and a replay made from that call replaces it (one made before the plans were forgotten
    # declines for good).
    replay: Optional[Callable] = None


def _no_replay(q, k, v):
    return None


_NO_REPLAY = _no_replay


def _replay_for(decision: Decision, call: AttentionCall, return_lse: bool):
    """The replay to keep for the kind of `call`: _NO_REPLAY where there can be none (a graph our op would record;
    a backend without replays), None to try again at the next call. The native route's replay is SDPA with the
    kind's route (native.replay); it never serves a call that wants the LSE (routes.py)."""
    if decision.backend is None:
        return _NO_REPLAY if return_lse else native.replay(decision.route, decision.options.scale)
    if decision.problem.needs_grad or not decision.backend.ops.forward.replays:
        return _NO_REPLAY
    if trace.enabled():  # a traced call counts in the op's implementation: the full path
        return None
    return decision.backend.ops.forward.replay_for(call)


def _attend(call: AttentionCall, return_lse: bool):
    """Route a validated call: the platform's fused kernel where it is exact, else the chosen backend's
    custom op."""
    return _run(_decide(call, return_lse), call, return_lse)


def _decide(call: AttentionCall, return_lse: bool) -> Decision:
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (call.q, call.k, call.v, call.attn_mask, call.sinks)
    )
    problem = describe(call, needs_grad=needs_grad)
    mask = call.attn_mask
    route = dispatch.route(problem, wants_lse=return_lse, mask_dtype=None if mask is None else mask.dtype,
                           mask_needs_grad=mask is not None and mask.requires_grad,
                           unit_stride=routes.unit_last_stride(call.q, call.k, call.v, mask))
    return Decision(route, None if route.native else dispatch.select(problem), problem, call.options)


def _run(decision: Decision, call: AttentionCall, return_lse: bool):
    if ops.forward_ad_active():  # before the native route too, whose kernels raise in torch's words or not at all
        ops.refuse_tangents(call.op_args())
    if trace.enabled():
        dispatch.record_route(decision.route, decision.problem, "fwd")
    if decision.backend is None:  # the platform's fused kernel computes exactly this call (routes.py)
        return native.forward(call, decision.route)
    if call.q.is_meta:  # no values to read (a varlen backend may read cu_seqlens): the op's shape function
        out, lse = decision.backend.ops.forward.op(*call.op_args())
    else:
        out, lse = decision.backend.ops.forward(call, decision.problem)
    return (out, lse) if return_lse else out


def validated_call(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, attn_mask=None,
                   alibi_slopes=None, sinks=None, dropout_p=0.0, softmax_scale=None, causal=False,
                   window_size=NO_WINDOW, softcap=0.0, dropout_seed=None, generator=None,
                   bf16_backward=False) -> AttentionCall:
    """The options checked and causal folded into the window; the helper tensors normalised to what
    every backend binds (helper_tensors.py says why). q/k/v/mask/slopes/offsets were checked by the caller."""
    window = fold_causal(scalars.flag(causal, "causal"), check_window(window_size))
    scale = check_scale(softmax_scale, q.shape[-1])
    softcap = check_softcap(softcap)
    dropout_p = check_dropout(dropout_p)
    check_sinks(sinks, q.shape[-2], q.device)
    seed = _dropout_seed(dropout_p, dropout_seed, generator)
    bf16_backward = check_bf16_backward(bf16_backward, q.dtype)
    options = Options(scale, window[0], window[1], softcap, dropout_p, max_seqlen_q, max_seqlen_k, bf16_backward)
    return AttentionCall(
        q, k, v, options,
        attn_mask=helper_tensors.attention_mask(attn_mask, q.dtype),
        alibi_slopes=helper_tensors.per_head_floats(alibi_slopes, q.dtype),
        sinks=helper_tensors.per_head_floats(sinks, q.dtype),
        cu_seqlens_q=helper_tensors.index_vector(cu_seqlens_q, "cu_seqlens_q", q.shape[0]),
        cu_seqlens_k=helper_tensors.index_vector(cu_seqlens_k, "cu_seqlens_k", k.shape[0]),
        dropout_seed=seed)


def _dropout_seed(dropout_p: float, dropout_seed, generator) -> torch.Tensor | None:
    """The dropout seed of a call. Both arguments are checked whatever dropout_p is (a wrong kind was accepted and
    ignored at dropout_p=0). An int seed is taken modulo 2**32, the kernels' seed width."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if dropout_seed is not None and generator is not None:
        raise ValueError("dropout_seed, generator: expected one of them (the seed fixes the mask, so the generator "
                         "would be ignored), got both")
    seed = None
    if isinstance(dropout_seed, torch.Tensor):
        seed = scalars.seed_tensor(dropout_seed, "dropout_seed")
    elif dropout_seed is not None:
        seed = scalars.int_like(dropout_seed, "dropout_seed", "an int, a 1-element int tensor or None")
    if dropout_p == 0:
        return None
    if seed is None:
        return new_seed(generator)
    if isinstance(seed, torch.Tensor):
        return seed.to(torch.int64).reshape(())
    return torch.tensor(seed & 0xFFFFFFFF, dtype=torch.int64)
