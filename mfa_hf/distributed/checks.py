"""Validation of a context-parallel call: each rank checks its own arguments, then every rank learns
what every other rank passed, so that a mistake on one rank raises on all of them (instead of leaving
the others waiting on a transfer that never comes) and a disagreement names the argument.

The exchange is one small all_gather_object per call: shapes, dtypes, options and any local error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .. import scalars
from ..kernels.contract import fold_causal
from ..problem import check_qkv, check_scale, check_sinks, check_softcap, check_window
from .comm import Group, resolve_group

LAYOUT = "(B, S, H, D), this rank's shard of the sequence"
PACKED = "(T, H, D), this rank's contiguous shard of the packed token stream"


@dataclass(frozen=True)
class Checked:
    """The call's options, validated and equal on every rank."""

    group: Group
    window: tuple[int, int]  # causal folded in (right = 0)
    scale: float
    softcap: float
    extra: object = None  # what local_check returned (equal on every rank)


def validate(group, q, k, v, causal, window_size, softcap, sinks, softmax_scale,
             local_check: Optional[Callable[[Group], object]] = None, packed: bool = False,
             extra_name: str = "") -> Checked:
    """Check this rank's arguments, agree with every rank of `group`, and return the options.

    packed: q, k, v are (T, H, D) (varlen) instead of (B, S, H, D). local_check(group) may return facts
    (picklable) that every rank must agree on; a disagreement raises naming `extra_name`."""
    resolved = resolve_group(group)
    error, options, extra = None, None, None
    try:
        check_qkv(q, k, v, rank=3 if packed else 4, layout=PACKED if packed else LAYOUT)
        window = fold_causal(scalars.flag(causal, "causal"), check_window(window_size))
        options = (window, check_scale(softmax_scale, q.shape[-1]), check_softcap(softcap))
        check_sinks(sinks, q.shape[-2], q.device)
        if local_check is not None:
            extra = local_check(resolved)
    except (TypeError, ValueError, NotImplementedError) as raised:
        error = raised
    facts = _facts(q, k, v, sinks, options, error, extra)
    gathered: list = [None] * resolved.size
    dist.all_gather_object(gathered, facts, group=resolved.handle)
    if error is not None:
        raise error
    _agree(gathered, resolved.rank, extra_name)
    window, scale, cap = options
    return Checked(resolved.with_staging(q.device), window, scale, cap, extra)


def _facts(q, k, v, sinks, options, error, extra) -> dict:
    def shape(t):
        return tuple(t.shape) if isinstance(t, torch.Tensor) else None

    def dtype(t):
        return str(t.dtype) if isinstance(t, torch.Tensor) else None

    return {"error": None if error is None else f"{type(error).__name__}: {error}",
            "q": shape(q), "k": shape(k), "v": shape(v), "sinks": shape(sinks),
            "dtype": dtype(q), "options": options, "extra": extra}


_NAMES = {"q": "q: expected the same shape on every rank (each rank holds N / ranks tokens)",
          "k": "k: expected the same shape on every rank (each rank holds N / ranks tokens)",
          "v": "v: expected the same shape on every rank",
          "sinks": "sinks: expected the same sinks (or None) on every rank",
          "dtype": "q: expected the same dtype on every rank",
          "options": "causal/window_size/softmax_scale/softcap: expected the same options on every rank"}


def _agree(gathered: list[dict], rank: int, extra_name: str) -> None:
    for other, facts in enumerate(gathered):
        if facts["error"] is not None:
            raise ValueError(f"group: rank {other} refused its arguments ({facts['error']})")
    mine = gathered[rank]
    names = {**_NAMES, "extra": f"{extra_name}: expected the same values on every rank"}
    for other, facts in enumerate(gathered):
        for key, message in names.items():
            if facts[key] != mine[key]:
                raise ValueError(f"{message}, got {facts[key]} on rank {other} and {mine[key]} on rank {rank}")
