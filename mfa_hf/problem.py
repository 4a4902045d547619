"""One place that validates attention inputs and describes the problem for dispatch.

Kernels assume valid input. Every error names the argument, what was expected and what came.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from enum import Enum

import torch

from . import scalars

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NO_WINDOW = (-1, -1)


class InputError(ValueError, RuntimeError):
    """Bad input where the API mfa-hf stands in for raises RuntimeError (FlashAttention's C++ checks,
    mps-flash-attn's rank checks): code written against either type catches it; ours is a ValueError."""


class MaskKind(str, Enum):
    NONE = "none"
    BOOL = "bool"
    ADDITIVE = "additive"


@dataclass(frozen=True)
class AttentionProblem:
    """What a backend needs to know to decide whether it can serve a call (no tensors inside)."""

    device_type: str
    dtype: torch.dtype
    batch: int
    seqlen_q: int  # the maximum length for varlen problems
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim_qk: int
    head_dim_v: int
    causal: bool = False
    window: tuple[int, int] = NO_WINDOW
    softcap: float = 0.0
    has_alibi: bool = False
    has_sinks: bool = False
    mask: MaskKind = MaskKind.NONE
    varlen: bool = False
    dropout_p: float = 0.0
    kv_format: str = "none"
    needs_grad: bool = False
    # The largest element offset (+ 1) that indexing any tensor of the call reaches from its data
    # pointer, outputs and the additive mask's gradient included: backends that index in 32 bits
    # refuse 2**31 and beyond.
    largest_span: int = 0
    bf16_backward: bool = False  # a backward with bfloat16 matmul operands will be asked for (needs_grad)

    def flags(self) -> str:
        """A short, stable description of the features in use (for MFA_TRACE)."""
        parts = []
        if self.causal:
            parts.append("causal")
        if self.window not in (NO_WINDOW, (-1, 0)):  # (-1, 0) is causal folded into the window
            parts.append(f"window={self.window[0]},{self.window[1]}")
        if self.softcap > 0:
            parts.append("softcap")
        if self.has_alibi:
            parts.append("alibi")
        if self.has_sinks:
            parts.append("sinks")
        if self.mask is not MaskKind.NONE:
            parts.append(f"mask={self.mask.value}")
        if self.varlen:
            parts.append("varlen")
        if self.dropout_p > 0:
            parts.append("dropout")
        if self.kv_format != "none":
            parts.append(f"kv={self.kv_format}")
        if self.heads_q != self.heads_kv:
            parts.append(f"gqa={self.heads_q // self.heads_kv}")
        if self.bf16_backward:
            parts.append("bf16_backward")
        return " ".join(parts) or "-"


# The rules for q, k, v and attn_mask are written once, as functions returning the first refusal (the
# exception type and message) or None. check_* raise it; *_reason return its message ("" when the
# input passes), for callers that route a call elsewhere instead of raising (the SDPA patch).
Refusal = tuple[type[Exception], str]


def fits_dim(got, full) -> bool:
    """Whether a size `got` broadcasts to `full` (1 or equal). Written with ==, never `got in (1, full)`: under
    torch.compile with dynamic shapes dynamo answers `5 in (1, s0)` False (it matches a SymInt in a tuple by
    identity), so a static mask beside a dynamic q was refused."""
    return got == 1 or got == full


def shape_is(shape, *options) -> bool:
    """Whether `shape` equals one of the option shapes, dim by dim with == (see fits_dim)."""
    return any(len(shape) == len(option) and all(a == b for a, b in zip(shape, option)) for option in options)


def _raise(refusal: Refusal | None) -> None:
    if refusal is not None:
        raise refusal[0](refusal[1])


def _reason(refusal: Refusal | None) -> str:
    return "" if refusal is None else refusal[1]


def dense_refusal(t: torch.Tensor, name: str) -> Refusal | None:
    """Every tensor argument must be dense (strided): nested (strided or jagged) and sparse tensors have no
    sizes/strides the kernels could bind, and used to fail deep inside with torch's internal errors."""
    if t.is_nested or t.layout is not torch.strided:
        got = "a nested tensor (pack its sequences for flash_attn_varlen_func)" if t.is_nested else \
            f"a {str(t.layout).replace('torch.', '')} tensor"
        return TypeError, f"{name}: expected a dense (strided) tensor, got {got}"
    return None


def check_dense(t, name: str) -> None:
    """dense_refusal as a check (anything that is not a tensor passes: the caller's own check names it)."""
    if isinstance(t, torch.Tensor):
        _raise(dense_refusal(t, name))


def check_rank(q, k, v, rank: int, layout: str) -> None:
    _raise(_rank_refusal(q, k, v, rank, layout))


def rank_reason(q, k, v, rank: int, layout: str) -> str:
    """check_rank's message for these inputs, or "" when they pass (never raises)."""
    return _reason(_rank_refusal(q, k, v, rank, layout))


def _rank_refusal(q, k, v, rank: int, layout: str) -> Refusal | None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return TypeError, f"{name}: expected a torch.Tensor, got {type(t).__name__}"
        refusal = dense_refusal(t, name)
        if refusal is not None:
            return refusal
        if t.dim() != rank:
            return ValueError, f"{name}: expected a {rank}-D tensor {layout}, got shape {tuple(t.shape)}"
    return None


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, layout: str) -> None:
    """Shapes (rank 4 for (B, S, H, D), rank 3 for packed (T, H, D)), dtypes and devices."""
    _raise(_qkv_refusal(q, k, v, rank, layout, rank - 3, rank - 2))


def qkv_reason(q, k, v, rank: int, layout: str, seq_dim: int | None = None, head_dim: int | None = None) -> str:
    """check_qkv's message for these inputs, or "" when they pass (never raises). seq_dim and head_dim
    (default rank - 3 and rank - 2, check_qkv's layouts) let heads-first layouts such as SDPA's
    (B, H, L, E) be checked in place, without a transposed view."""
    seq_dim = rank - 3 if seq_dim is None else seq_dim
    head_dim = rank - 2 if head_dim is None else head_dim
    return _reason(_qkv_refusal(q, k, v, rank, layout, seq_dim, head_dim))


def _qkv_refusal(q, k, v, rank: int, layout: str, seq_dim: int, head_dim: int) -> Refusal | None:
    refusal = _rank_refusal(q, k, v, rank, layout)
    if refusal is not None:
        return refusal
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in FLOAT_DTYPES:
            return TypeError, f"{name}: expected float16, bfloat16, float32 or float64, got {t.dtype}"
    for name, t in (("k", k), ("v", v)):  # the device first, as FlashAttention and mps-flash-attn check it
        if t.device != q.device:
            return ValueError, f"{name}: expected device {q.device} like q, got {t.device}"
        if t.dtype != q.dtype:
            return TypeError, f"{name}: expected dtype {q.dtype} like q, got {t.dtype}"
    if rank == 4 and not (q.shape[0] == k.shape[0] == v.shape[0]):
        return ValueError, f"k, v: expected batch {q.shape[0]} like q, got {k.shape[0]} and {v.shape[0]}"
    if k.shape[seq_dim] != v.shape[seq_dim]:
        return ValueError, f"v: expected {k.shape[seq_dim]} keys like k, got {v.shape[seq_dim]}"
    if k.shape[head_dim] != v.shape[head_dim]:
        return ValueError, f"v: expected {k.shape[head_dim]} heads like k, got {v.shape[head_dim]}"
    heads_q, heads_kv = q.shape[head_dim], k.shape[head_dim]
    if heads_kv == 0 or heads_q % heads_kv != 0:
        return ValueError, f"k: expected a number of KV heads dividing {heads_q} query heads, got {heads_kv}"
    if k.shape[-1] != q.shape[-1]:
        return ValueError, f"k: expected head dim {q.shape[-1]} like q, got {k.shape[-1]}"
    for name, t in (("q", q), ("v", v)):  # any width: the torch backend serves those the kernels are not built for
        if t.shape[-1] < 1:
            return ValueError, f"{name}: expected a head dim >= 1, got {t.shape[-1]}"
    return None


def check_window(window_size) -> tuple[int, int]:
    """(left, right), each an int >= -1 (-1 = unbounded): ints, numpy ints, 0-d int tensors (anything
    with __index__); bools and floats are refused. Wrong kinds raise ValueError here, as they always did."""
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"window_size: expected a pair (left, right), got {window_size!r}")
    sides = []
    for side, value in zip(("left", "right"), window_size):
        expected = f"{side} >= -1 (an int, -1 = unbounded)"
        index = scalars.int_like(value, "window_size", expected, ValueError)
        if index < -1:
            raise ValueError(f"window_size: expected {expected}, got {value!r}")
        sides.append(index)
    return sides[0], sides[1]


FLOAT32_MAX = torch.finfo(torch.float32).max


def check_scale(softmax_scale, head_dim: int, name: str = "softmax_scale") -> float:
    """None: 1/sqrt(head_dim). Else a finite real number (negative and 0 allowed); see mfa_hf.scalars."""
    if softmax_scale is None:
        if head_dim < 1:
            raise ValueError(f"q: expected a head dim >= 1, got {head_dim}")
        return 1.0 / math.sqrt(head_dim)
    value = scalars.real_number(softmax_scale, name, "a finite number or None (1/sqrt(D))")
    if not scalars.is_finite(value):
        raise ValueError(f"{name}: expected a finite number, got {softmax_scale!r}")
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name}: expected a number within float32's range (kernels compute in float32), got "
                         f"{softmax_scale!r}")
    return value


def check_softcap(softcap) -> float:
    value = scalars.real_number(softcap, "softcap", "a finite number >= 0 (0 = off)")
    if not scalars.is_finite(value) or value < 0 or value > FLOAT32_MAX:
        raise ValueError(f"softcap: expected a finite number >= 0 (0 = off) within float32's range (kernels "
                         f"compute in float32: a larger cap became inf and every output NaN), got {softcap!r}")
    return value


def check_dropout(dropout_p) -> float:
    value = scalars.real_number(dropout_p, "dropout_p", "a probability in [0, 1)")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p!r}")
    return value


def check_bf16_backward(bf16_backward, dtype: torch.dtype) -> bool:
    """bf16_backward: a bool; bfloat16 matmul operands serve float16/bfloat16/float32 inputs only."""
    value = scalars.flag(bf16_backward, "bf16_backward")
    if value and dtype == torch.float64:
        raise ValueError("bf16_backward: expected float16, bfloat16 or float32 inputs (a float64 backward stays "
                         "float64), got torch.float64")
    return value


def check_mask(attn_mask, batch: int, heads_q: int, lq: int, lk: int, device: torch.device) -> MaskKind:
    """attn_mask broadcastable to (B, Hq, Lq, Lk): bool (True = attend) or additive float."""
    _raise(_mask_refusal(attn_mask, batch, heads_q, lq, lk, device))
    if attn_mask is None:
        return MaskKind.NONE
    return MaskKind.BOOL if attn_mask.dtype == torch.bool else MaskKind.ADDITIVE


def mask_reason(attn_mask, batch: int, heads_q: int, lq: int, lk: int, device: torch.device) -> str:
    """check_mask's message for this mask, or "" when it passes (never raises)."""
    return _reason(_mask_refusal(attn_mask, batch, heads_q, lq, lk, device))


def _mask_refusal(attn_mask, batch: int, heads_q: int, lq: int, lk: int, device: torch.device) -> Refusal | None:
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        return TypeError, f"attn_mask: expected a torch.Tensor or None, got {type(attn_mask).__name__}"
    refusal = dense_refusal(attn_mask, "attn_mask")
    if refusal is not None:
        return refusal
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in FLOAT_DTYPES:
        return TypeError, f"attn_mask: expected dtype bool (True = attend) or a float dtype, got {attn_mask.dtype}"
    if attn_mask.device != device:
        return ValueError, f"attn_mask: expected device {device} like q, got {attn_mask.device}"
    target = (batch, heads_q, lq, lk)
    shape = tuple(attn_mask.shape)
    padded = (1,) * (4 - len(shape)) + shape if len(shape) <= 4 else None
    if padded is None or not all(fits_dim(m, t) for m, t in zip(padded, target)):
        return ValueError, f"attn_mask: expected a shape broadcastable to (B, Hq, Lq, Lk) = {target}, got {shape}"
    return None


def check_alibi(alibi_slopes, batch: int, heads_q: int, device: torch.device) -> bool:
    if alibi_slopes is None:
        return False
    _check_float_vector("alibi_slopes", alibi_slopes, device)
    if not shape_is(alibi_slopes.shape, (heads_q,), (batch, heads_q)):
        raise ValueError(
            f"alibi_slopes: expected shape ({heads_q},) or ({batch}, {heads_q}), got {tuple(alibi_slopes.shape)}"
        )
    if alibi_slopes.requires_grad and torch.is_grad_enabled():
        # No kernel computes d(loss)/d(slopes) (nor does FlashAttention-2's): a silent None gradient would train a
        # learnable slope as a constant.
        raise ValueError("alibi_slopes: expected fixed slopes (no gradient is computed for them), got a tensor "
                         "requiring grad; pass alibi_slopes.detach()")
    return True


def check_sinks(sinks, heads_q: int, device: torch.device) -> bool:
    if sinks is None:
        return False
    _check_float_vector("sinks", sinks, device)
    if tuple(sinks.shape) != (heads_q,):
        raise ValueError(f"sinks: expected one logit per query head, shape ({heads_q},), got {tuple(sinks.shape)}")
    return True


def _check_float_vector(name: str, t, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    check_dense(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float dtype, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} like q, got {t.device}")


CHECK_VALUES_ENV = "MFA_CHECK_VALUES"


def values_checked(t: torch.Tensor) -> bool:
    """Whether the values of an index tensor (cu_seqlens, cache_seqlens, cache_batch_idx, block_table)
    are checked on the host.

    CPU tensors: always (reading them costs no device sync). Tensors on mps/cuda: only with
    MFA_CHECK_VALUES=1, because reading values back waits for everything queued on the device, once per
    layer per step. Without it they are trusted, as FlashAttention-2 trusts them: sizes come from shapes
    and max_seqlen arguments, and an out-of-range value gives undefined results (never an out-of-bounds
    access: kernels clamp what they index). torch._assert_async would not help: it has no mps kernel and
    on cuda a failed assert kills the CUDA context. Never while compiling (values are graph data), on
    meta (there are none) or under a functorch transform (a tensor vmap batches has no values to read)."""
    if torch.compiler.is_compiling() or t.is_meta or torch._C._are_functorch_transforms_active():
        return False
    return t.device.type == "cpu" or os.environ.get(CHECK_VALUES_ENV, "0") not in ("", "0")


def check_cu_seqlens(cu_seqlens, name: str, total: int, batch: int | None,
                     device: torch.device) -> tuple[int, list[int] | None]:
    """Validate cumulative sequence lengths; returns the batch size they describe (from the shape) and
    the offsets when their values were checked (values_checked: CPU tensors, or MFA_CHECK_VALUES=1),
    else None: nothing is read back from the device."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(cu_seqlens).__name__}")
    check_dense(cu_seqlens, name)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected dtype int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name}: expected a 1-D tensor of B + 1 offsets, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name}: expected device {device} like q, got {cu_seqlens.device}")
    count = cu_seqlens.numel() - 1
    if batch is not None and count != batch:
        raise ValueError(f"{name}: expected {batch + 1} offsets like cu_seqlens_q, got {count + 1}")
    if not values_checked(cu_seqlens):
        return count, None
    values = cu_seqlens.tolist()
    check_offsets(values, name, total)
    return count, values


def check_offsets(values: list[int], name: str, total: int) -> None:
    """cu_seqlens values (read on the host): 0, non-decreasing, ending at the total length."""
    if values[0] != 0:
        raise ValueError(f"{name}: expected to start at 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name}: expected non-decreasing offsets, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name}: expected to end at the total length {total}, got {values[-1]}")


def check_max_seqlen(max_seqlen, name: str, offsets: list[int] | None) -> int:
    """max_seqlen against the offsets check_cu_seqlens read, when it read them (None: trusted, as in
    FlashAttention-2; kernels size their grids from it)."""
    value = scalars.int_like(max_seqlen, name, "an int >= 0 (the longest sequence or more)")
    if value < 0:
        raise ValueError(f"{name}: expected an int >= 0 (the longest sequence or more), got {value}")
    if offsets is None:
        return value
    longest = max(b - a for a, b in zip(offsets, offsets[1:]))
    if value < longest:
        raise ValueError(f"{name}: expected at least the longest sequence ({longest}), got {value}")
    return value
