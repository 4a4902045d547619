"""Opt-in: route `torch.nn.functional.scaled_dot_product_attention` to mfa-hf kernels.

    import mfa_hf
    mfa_hf.replace_sdpa()            # or: with mfa_hf.sdpa_patched(): ...
    ...
    mfa_hf.restore_sdpa()

Nothing is patched on import. While patched, a call is served by our kernels only when it is on an
enabled device (mps and cuda by default), big enough (Lq * Lk >= min_scores) and one whose SDPA
meaning we reproduce exactly; every other call goes to the stock function unchanged, and the reason
is counted in `mfa_hf.trace` (printed at exit with MFA_TRACE=1). The meanings kept are SDPA's, not
FlashAttention's:
- bool attn_mask: True = attend; a float attn_mask is added to the scores exactly as it is.
- is_causal aligns top-left (query i sees keys j <= i), also when Lq != Lk (mfa_hf.sdpa_semantics
  translates it: causal, a window, or causal over the first Lq keys; never a mask).
- scale=None means 1/sqrt(E); enable_gqa=True lets Hq be a multiple of Hkv (head h reads KV head
  h // (Hq // Hkv), like SDPA's repeat_interleave).
- a query row with no visible key gives 0, as stock SDPA does on CPU in torch 2.13.
Sent to the stock function, each for a stated reason: dropout_p > 0 (its RNG stream is torch's, and
ours differs), attn_mask together with is_causal (stock SDPA combines them on some backends and
raises on others), head broadcasting without enable_gqa, broadcast batch dims, nested tensors,
ranks other than 3 or 4, dtypes and mask dtypes stock SDPA would reject, empty sequences.

Only calls that look the function up on `torch.nn.functional` at call time are routed; code that
bound it earlier (`from torch.nn.functional import scaled_dot_product_attention`) keeps the stock one.

Threads: the patch is process-wide, because torch.nn.functional is one module for every thread. It is
reference-counted: replace_sdpa holds it until restore_sdpa, each open sdpa_patched block (in any
thread) holds it too, and the function found at install is restored exactly when the last hold ends.
A call from inside a block uses that thread's innermost block's gate; a call from a thread with no open
block still goes through the patch, with the gate of the newest hold (see sdpa_patched).
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from mfa_hf import api, problem, scalars, sdpa_semantics, trace

SOURCE = "sdpa_patch"
DEFAULT_DEVICES = ("mps", "cuda")
# Below this many scores (Lq * Lk) a call stays on stock SDPA. Not measured on Apple hardware yet: a
# conservative guess from the peers' reports (stock is as fast below ~1.5K tokens) -- tune with
# replace_sdpa(min_scores=...).
DEFAULT_MIN_SCORES = 1024 * 1024


@dataclass(frozen=True)
class Gate:
    devices: tuple[str, ...]
    min_scores: int


# The patch is process-wide, because torch.nn.functional is: one module attribute for every thread.
# It is held by replace_sdpa (one hold, until restore_sdpa) and by each open sdpa_patched block (in any
# thread); it is installed while anything holds it and removed, restoring exactly the function it
# replaced, when the last hold ends. The lock serialises installing and removing; calls never take it.
_lock = threading.Lock()
_holds: list["_Hold"] = []  # in the order taken; the newest one's gate is the process gate
_explicit: "_Hold | None" = None  # replace_sdpa's hold
_original = None  # the function replaced, while the patch is installed
_replaced = None  # the function replaced by the latest install (kept after removal for stale references)
_gate: Gate | None = None  # the process gate while installed (None when not)
_inside = threading.local()  # set while our kernels run: a nested SDPA call goes to stock
_thread = threading.local()  # .holds: this thread's open sdpa_patched blocks, innermost last


class _Hold:
    """One hold on the patch (identity matters, not the gate: two blocks may share a gate)."""

    __slots__ = ("gate",)

    def __init__(self, gate: Gate):
        self.gate = gate


def replace_sdpa(devices: tuple[str, ...] | list[str] = DEFAULT_DEVICES, min_scores: int = DEFAULT_MIN_SCORES) -> None:
    """Route F.scaled_dot_product_attention to our kernels for calls that pass the gate.

    devices: device types served (add "cpu" to exercise the patch without a GPU). min_scores: the
    smallest Lq * Lk served. Calling it again while patched only changes the gate (it becomes the
    process gate, see sdpa_patched). Process-wide: every thread's calls are routed.
    """
    global _explicit
    gate = _check_gate(devices, min_scores)
    with _lock:
        if _explicit is not None:
            _holds.remove(_explicit)
        _explicit = _Hold(gate)
        _holds.append(_explicit)
        _sync()


def restore_sdpa() -> None:
    """End replace_sdpa's hold: the stock function returns unless an sdpa_patched block is still open
    (in any thread; the last one to close restores it). A no-op when replace_sdpa is not in effect."""
    global _explicit
    with _lock:
        if _explicit is None:
            return
        if len(_holds) == 1:
            _check_still_ours("restore_sdpa")  # raises with nothing changed
        _holds.remove(_explicit)
        _explicit = None
        _sync()


def is_patched() -> bool:
    return _original is not None


@contextmanager
def sdpa_patched(devices: tuple[str, ...] | list[str] = DEFAULT_DEVICES,
                 min_scores: int = DEFAULT_MIN_SCORES) -> Iterator[None]:
    """The patch for the duration of the block; reference-counted, so safe from several threads at once.

    Process-wide, because torch.nn.functional is: while any block is open (in any thread) every thread's
    F.scaled_dot_product_attention is the patch; when the last block closes (and replace_sdpa is not in
    effect) the function found at install is restored exactly. The gate: calls made inside a block use
    that thread's innermost block's gate (nesting: the inner gate, then the outer one again); calls from
    a thread with no open block (a worker thread, DataParallel's replicas) use the process gate, the
    gate of the newest hold still open (the newest block entered, or replace_sdpa if called later).
    """
    hold = _Hold(_check_gate(devices, min_scores))
    mine = _thread_holds()
    with _lock:
        _holds.append(hold)
        _sync()
    mine.append(hold)
    try:
        yield
    finally:
        mine.remove(hold)
        _release(hold)


def _thread_holds() -> list:
    holds = getattr(_thread, "holds", None)
    if holds is None:
        holds = _thread.holds = []
    return holds


def _release(hold: _Hold) -> None:
    global _original, _gate
    with _lock:
        _holds.remove(hold)
        if not _holds and _original is not None and F.scaled_dot_product_attention is not patched_sdpa:
            # Someone patched over us: their function stays; ours (inside it) now passes every call through.
            _original, _gate = None, None
            _check_still_ours("sdpa_patched")  # raises
        _sync()


def _sync() -> None:
    """Install or remove the patch and set the process gate from _holds (called under _lock)."""
    global _original, _replaced, _gate
    if _holds:
        _gate = _holds[-1].gate
        if _original is None and F.scaled_dot_product_attention is not patched_sdpa:
            _original = _replaced = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = patched_sdpa
    elif _original is not None:
        F.scaled_dot_product_attention = _original
        _original, _gate = None, None


def _check_still_ours(caller: str) -> None:
    current = F.scaled_dot_product_attention
    if current is not patched_sdpa:
        raise RuntimeError(
            f"{caller}: expected torch.nn.functional.scaled_dot_product_attention to be mfa-hf's patch, got "
            f"{current!r} (patched again after replace_sdpa); undo that patch first"
        )


def _check_gate(devices, min_scores) -> Gate:
    expected = "a tuple of device types such as ('mps', 'cuda')"
    if isinstance(devices, (str, bytes)) or not isinstance(devices, (tuple, list, set, frozenset)):
        raise TypeError(f"devices: expected {expected}, got {devices!r}")
    for device in devices:
        if not isinstance(device, str):
            raise TypeError(f"devices: expected {expected}, got {devices!r} (an item is {type(device).__name__})")
        try:
            kind = torch.device(device).type
        except (RuntimeError, ValueError):
            raise ValueError(f"devices: expected device types torch knows (such as 'mps', 'cuda', 'cpu'), "
                             f"got {device!r}") from None
        if kind != device:
            raise ValueError(f"devices: expected device types without an index (the gate matches q.device.type), "
                             f"got {device!r}; use {kind!r}")
    min_scores = scalars.int_like(min_scores, "min_scores", "an int >= 0 (smallest Lq * Lk served)",
                                  ValueError)  # as min_scores always raised
    if min_scores < 0:
        raise ValueError(f"min_scores: expected an int >= 0 (smallest Lq * Lk served), got {min_scores!r}")
    return Gate(tuple(devices), min_scores)


def patched_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
    """Stock SDPA's signature and meaning; served by mfa-hf when `unserved_reason` finds nothing."""
    original, gate = _original, _gate
    holds = getattr(_thread, "holds", None)
    if holds and gate is not None:
        try:
            gate = holds[-1].gate  # this thread's innermost block
        except IndexError:  # closed from another thread just now
            pass
    if original is None:  # a stale reference kept after the patch was removed (or one racing with removal)
        original, gate = _replaced or F.scaled_dot_product_attention, None
    reason = "patch restored" if gate is None else unserved_reason(
        gate, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if reason:
        trace.record_fallback(SOURCE, reason)
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)
    _inside.active = True
    try:
        return _serve(query, key, value, attn_mask, is_causal, scale)
    finally:
        _inside.active = False


def unserved_reason(gate: Gate, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> str:
    """Why this call goes to stock SDPA ("" when we serve it). Cheap checks, no device sync.

    The rules our validation has (tensor types, dtypes, devices, heads dividing, head dims, mask dtype,
    device and shape) come from mfa_hf.problem's non-raising twins, with its messages; the rest are
    SDPA's or the gate's."""
    if getattr(_inside, "active", False):
        return "called from inside an mfa-hf kernel"
    for check in (_form_reason, _device_reason, _qkv_reason, _option_reason, _mask_reason, _size_reason):
        reason = check(gate, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if reason:
            return reason
    return ""


def _form_reason(gate, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Tensors of one rank (validation's rule), then what stock SDPA allows and we do not serve."""
    if any(isinstance(t, torch.Tensor) and t.is_nested for t in (q, k, v, attn_mask)):
        return "nested tensors"
    rank = q.dim() if isinstance(q, torch.Tensor) else 4
    reason = problem.rank_reason(q, k, v, rank, _LAYOUTS.get(rank, "(..., H, L, E)"))
    if reason:
        return reason
    if rank not in (3, 4):
        return f"ranks q={q.dim()} k={k.dim()} v={v.dim()} (served: 3 or 4, all equal)"
    if q.shape[:-3] != k.shape[:-3] or q.shape[:-3] != v.shape[:-3]:
        return "batch dims differ between q, k, v (stock SDPA broadcasts them)"
    heads_q, heads_kv = q.shape[-3], k.shape[-3]
    if heads_q != heads_kv and not enable_gqa:
        return f"{heads_q} query heads over {heads_kv} KV heads without enable_gqa"
    return ""


_LAYOUTS = {3: "(H, L, E)", 4: "(B, H, L, E)"}


def _device_reason(gate, q, *_):
    if q.device.type not in gate.devices:
        return f"device {q.device.type} not enabled (devices={gate.devices})"
    return ""


def _qkv_reason(gate, q, k, v, *_):
    """Validation's rules for q, k, v in SDPA's (..., H, L, E) layout; then empty calls stay on stock."""
    reason = problem.qkv_reason(q, k, v, q.dim(), _LAYOUTS[q.dim()], seq_dim=-2, head_dim=-3)
    if reason:
        return reason
    if q.shape[-2] == 0 or k.shape[-2] == 0 or q.shape[:-3].numel() == 0 or q.shape[-3] == 0:
        return "empty sequence or batch"
    return ""


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _option_reason(gate, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    if not (_real(dropout_p) and isinstance(is_causal, bool) and isinstance(enable_gqa, bool)
            and (scale is None or _real(scale))):
        # Stock SDPA raises its own error for these (or decides what they mean): it gets them as they are.
        return "dropout_p, is_causal, enable_gqa or scale of a type stock SDPA decides about"
    if dropout_p != 0:  # NaN and negative values too: stock SDPA's answer, whatever it is
        return "dropout_p > 0 (stock SDPA's RNG stream; ours differs)"
    if sdpa_semantics.causal_with_mask(is_causal, attn_mask):
        return "attn_mask with is_causal (stock SDPA combines them on some backends, raises on others)"
    if scale is not None and not scalars.is_finite(float(scale)):
        return f"scale={scale!r} is not finite"
    return ""


def _mask_reason(gate, q, k, v, attn_mask, *_):
    """Validation's mask rules (type, dtype, device, broadcasting), then the masks stock SDPA decides about."""
    if attn_mask is None:
        return ""
    batch = q.shape[0] if q.dim() == 4 else 1
    reason = problem.mask_reason(attn_mask, batch, q.shape[-3], q.shape[-2], k.shape[-2], q.device)
    if reason:
        return reason
    if attn_mask.dtype not in (torch.bool, q.dtype, torch.float32):
        return f"attn_mask dtype {attn_mask.dtype} with {q.dtype} inputs (stock SDPA decides)"
    if not 2 <= attn_mask.dim() <= q.dim():
        return f"attn_mask shape {tuple(attn_mask.shape)}: served ranks 2..{q.dim()} (stock SDPA decides the rest)"
    return ""


def _size_reason(gate, q, k, *_):
    scores = q.shape[-2] * k.shape[-2]
    if scores < gate.min_scores:
        return f"Lq*Lk below min_scores={gate.min_scores}"
    return ""


def _serve(q, k, v, attn_mask, is_causal, scale):
    """Our kernel with SDPA's meaning: (..., H, L, E) in, (..., H, L, Ev) out."""
    unbatched = q.dim() == 3
    if unbatched:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    sdpa = sdpa_semantics.translate(q.shape[-2], k.shape[-2], is_causal)  # no mask here (_option_reason)
    k, v = sdpa.keep_keys(k, v, seq_dim=-2)
    out = api.flash_attention(q, k, v, is_causal=sdpa.causal, attn_mask=attn_mask, window_size=sdpa.window,
                              scale=scale)
    return out.squeeze(0) if unbatched else out
