"""Launch utilities every backend shares: output allocation, empty answers, and the split-K policy.

Imports only torch (and the contract): every backend folder may import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# Tests set this so that every backend allocates its outputs filled with NaN: an element a kernel
# forgets to write then fails the comparison instead of passing by luck.
POISON_OUTPUTS = False


class BoundedMemo(dict):
    """key -> what a kind of call decided (a launch plan, a compiled kernel); `keep` stores one, clearing
    the memo first when it holds `limit` (a long generation adds a kind per cache length)."""

    limit = 1024

    def keep(self, key, value):
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value


def decode_layout(q: Tensor, keys, values) -> tuple:
    """What a decode launch depends on beyond its kind's shapes, dtypes and formats (mfa_hf/decode_plan.py): every
    stride, the scales' layout and the group sizes (keys/values: contract.CacheSide). Decode replays compare it
    on every call."""
    return (q.stride(), keys.codes.stride(), shape_and_strides(keys.scales), keys.group_size,
            values.codes.stride(), shape_and_strides(values.scales), values.group_size)


def shape_and_strides(t: Optional[Tensor]):
    """(shape, strides) of an optional tensor: part of a launch key (None when absent)."""
    return None if t is None else (t.shape, t.stride())


def new_output(shape, dtype, device) -> Tensor:
    """Allocate a kernel output (NaN-filled while POISON_OUTPUTS is set; an integer buffer gets its dtype's
    largest value, which no exact integer product of the kernels reaches)."""
    if POISON_OUTPUTS:
        poison = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max
        return torch.full(shape, poison, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def contiguous_strides(shape) -> tuple:
    """The strides torch.empty(shape) has (a launch plan's strides of the outputs it will allocate)."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """LSE is float32, except for float64 inputs (torch backend only), which keep their precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_shapes(q: Tensor, v: Tensor) -> tuple[tuple, tuple]:
    """(out, lse) shapes: dense (B, Lq, Hq, Dv) and (B, Hq, Lq); packed (Tq, Hq, Dv) and (Hq, Tq)."""
    out = tuple(q.shape[:-1]) + (v.shape[-1],)
    lse = (q.shape[1], q.shape[0]) if q.dim() == 3 else (q.shape[0], q.shape[2], q.shape[1])
    return out, lse


def empty_result(q: Tensor, v: Tensor, sinks: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The answer for Lq == 0 or Lk == 0: zeros, with LSE -inf (or the sink logit)."""
    out_shape, lse_shape = output_shapes(q, v)
    out = q.new_zeros(out_shape)
    if sinks is not None:
        lse = sinks.to(lse_dtype(q.dtype)).reshape((-1, 1) if q.dim() == 3 else (1, -1, 1)).expand(lse_shape).clone()
    else:
        lse = torch.full(lse_shape, -math.inf, dtype=lse_dtype(q.dtype), device=q.device)
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


@dataclass(frozen=True)
class SplitPolicy:
    """How many split-K pieces a decode divides each row's keys into, from the shape only.

    Enough independent work items (`work` without splitting x splits) to fill the device: at most
    `target_work` of them (rounded down: a second, nearly empty wave costs more than it gives; H200,
    B=8 Hkv=8 64k: 9 splits for 528 resident slots ran int8 in 0.53 ms, 16 splits in 0.39 ms), each
    split at least `min_keys` keys (below that a split's fixed cost and the merge outweigh its
    parallelism), never more splits than key blocks or `max_splits`. A requested count > 0 is taken
    as given (capped the same way).
    """

    target_work: int
    min_keys: int = 256
    max_splits: int = 64

    def splits(self, work: int, key_span: int, block: int = 1, requested: int = 0) -> int:
        useful = max(1, -(-key_span // max(1, block)))
        if requested <= 0:
            requested = min(max(1, self.target_work // max(1, work)), max(1, key_span // self.min_keys))
        return max(1, min(requested, useful, self.max_splits))
