"""Which path serves a call: the platform's own fused attention ("native") or our kernels.

A native kernel is used only where its semantics equal ours on that problem. That is decided in two
layers, kept apart on purpose:

- `semantic_reason(problem, ...)`: the rules, the same on every device. SDPA has no window, softcap,
  sinks, ALiBi, varlen, quantized KV, dropout RNG of ours, LSE output or mask gradient, and its causal
  is top-left: bottom-right causal equals it only when Lq == Lk, and for one query row (which sees
  every key: causal is then no mask, a left window a slice of the keys).
- a **gate table per device** (`native_table.py`): the limits of the platform's kernels (dtypes, head
  dims, query lengths, masks, GQA, gradients) and where they are faster. Outside them SDPA would run
  its O(N^2) math path, so we serve the call.

`choose(problem, ...)` gives a Route: the path and the reason, which MFA_TRACE counts. A forced
MFA_BACKEND (metal/triton/torch) turns routing off; MFA_BACKEND=native forces the native path and
raises where it cannot serve with exactly our semantics.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import native_table
from .problem import NO_WINDOW, AttentionProblem, MaskKind


@dataclass(frozen=True)
class Route:
    """native: the platform kernel `path` serves the call; else ours, and `reason` says why."""

    native: bool
    path: str
    reason: str
    is_causal: bool = False  # SDPA's flag (top-left, equal to ours here)
    key_start: int = 0  # one query row under a left window: the keys [key_start, Lk) it sees
    gate: native_table.NativeGate | None = None


OURS = "ours"


def unit_last_stride(*tensors) -> bool:
    """Whether every tensor given (None skipped) has a unit-stride last dim, as SDPA's fused kernels need."""
    return all(t is None or t.stride(-1) == 1 or t.shape[-1] == 1 for t in tensors)


def semantic_reason(problem: AttentionProblem, *, wants_lse: bool, mask_dtype=None,
                    mask_needs_grad: bool = False, unit_stride: bool = True) -> str:
    """Why SDPA cannot compute exactly this problem with a fused kernel ("" when it can)."""
    p = problem
    if not unit_stride:
        return "a tensor whose last dim is strided (SDPA's fused kernels need stride 1 there, else O(N^2) math)"
    if wants_lse:
        return "return_lse (SDPA returns no log-sum-exp)"
    if min(p.batch, p.seqlen_q, p.seqlen_k, p.heads_q) == 0:
        return "an empty problem"
    if p.varlen:
        return "varlen (packed sequences)"
    if p.kv_format != "none":
        return f"quantized KV ({p.kv_format})"
    if p.softcap > 0:
        return "softcap"
    if p.has_sinks:
        return "sinks"
    if p.has_alibi:
        return "ALiBi"
    if p.dropout_p > 0:
        return "dropout (our counter-based RNG)"
    if p.bf16_backward:
        return "bf16_backward (SDPA's backward has no bfloat16 mode)"
    if p.head_dim_v != p.head_dim_qk:
        return f"head_dim_v {p.head_dim_v} != head_dim_qk {p.head_dim_qk}"
    if p.heads_q % p.heads_kv:
        return f"heads_q {p.heads_q} not a multiple of heads_kv {p.heads_kv}"
    if p.mask is not MaskKind.NONE:
        if mask_needs_grad:
            return "a mask that requires grad"
        if p.mask is MaskKind.ADDITIVE and mask_dtype != p.dtype:
            return f"additive mask in {mask_dtype} for {p.dtype} inputs (SDPA would round it)"
    return _window_reason(p)


def _window_reason(p: AttentionProblem) -> str:
    if p.window == NO_WINDOW or p.seqlen_q == 1:  # one row sits on the last key: a left window is a slice
        return ""
    if p.window != (-1, 0):
        return f"sliding window {p.window}"
    if p.seqlen_q != p.seqlen_k:
        return f"bottom-right causal with Lq {p.seqlen_q} != Lk {p.seqlen_k} (SDPA's causal is top-left)"
    if p.mask is not MaskKind.NONE:
        return "a mask together with causal (SDPA takes one or the other)"
    return ""


def _sdpa_shape(p: AttentionProblem) -> tuple[bool, int]:
    """(is_causal, key_start) for SDPA, for a problem semantic_reason accepted."""
    if p.seqlen_q == 1:  # the row sits on the last key: right side sees nothing more, left side a slice
        left = p.window[0]
        return False, (0 if left < 0 else max(0, p.seqlen_k - 1 - left))
    return p.window == (-1, 0), 0


def gate_reason(gate: native_table.NativeGate, p: AttentionProblem) -> str:
    """Why the platform kernel `gate` does not serve this problem fused ("" when it does)."""
    if p.dtype not in gate.dtypes:
        return f"{gate.path}: dtype {p.dtype} not in {[str(d) for d in gate.dtypes]}"
    if gate.head_dims is not None and p.head_dim_qk not in gate.head_dims:
        return f"{gate.path}: head_dim {p.head_dim_qk} not in {list(gate.head_dims)}"
    if p.head_dim_qk > gate.max_head_dim or p.head_dim_qk % gate.head_dim_multiple:
        return f"{gate.path}: head_dim {p.head_dim_qk} (needs <= {gate.max_head_dim}, a multiple of " \
               f"{gate.head_dim_multiple})"
    if not gate.min_q <= p.seqlen_q <= gate.max_q:
        return f"{gate.path}: Lq {p.seqlen_q} outside [{gate.min_q}, {gate.max_q}]"
    if p.seqlen_k > gate.max_k:
        return f"{gate.path}: Lk {p.seqlen_k} > {gate.max_k}"
    if p.mask.value not in gate.masks:
        return f"{gate.path}: {p.mask.value} masks not verified exact"
    if p.heads_q != p.heads_kv and not gate.gqa:
        return f"{gate.path}: GQA"
    if p.needs_grad and not gate.grad:
        return f"{gate.path}: gradients ({gate.grad_reason})"
    return ""


def choose(problem: AttentionProblem, forced: str, *, wants_lse: bool = False, mask_dtype=None,
           mask_needs_grad: bool = False, unit_stride: bool = True, other_reason: str = "") -> Route:
    """The route for `problem` under MFA_BACKEND=`forced` ("auto", "native" or a backend name).
    other_reason: what the caller knows SDPA cannot express (e.g. a decode plan's per-row key ranges)."""
    if forced not in ("auto", "native"):
        return Route(False, OURS, f"MFA_BACKEND={forced}")
    reason = other_reason or semantic_reason(problem, wants_lse=wants_lse, mask_dtype=mask_dtype,
                                             mask_needs_grad=mask_needs_grad, unit_stride=unit_stride)
    if not reason:
        reasons = []
        for gate in native_table.gates(problem.device_type):
            refused = gate_reason(gate, problem)
            if not refused:
                is_causal, key_start = _sdpa_shape(problem)
                return Route(True, gate.path, "native has our semantics here", is_causal, key_start, gate)
            reasons.append(refused)
        reason = "; ".join(reasons) or f"no native kernel listed for {problem.device_type}"
    if forced == "native":
        raise NativeUnavailable(f"MFA_BACKEND=native cannot serve this call exactly: {reason}")
    return Route(False, OURS, reason)


class NativeUnavailable(RuntimeError):
    """MFA_BACKEND=native and the platform's kernel cannot compute this call with our semantics."""
