"""`threads` and `group_size` as torch.mps.compile_shader reads them.

`threads` is the total grid (dispatchThreads, 1-3 dimensions, edge threadgroups may be partial),
defaulting to the numel of the first tensor argument. `group_size` must have as many dimensions
and defaults to min(threads, max) in 1-D and (max, 1, 1) otherwise, where max is the pipeline's
maxTotalThreadsPerThreadgroup: the kernel's [[max_total_threads_per_threadgroup(N)]] capped at
1024, else 1024 (real pipelines may report less). A threadgroup of more threads than max is an
error: torch passes it to Metal unchecked and Metal's API validation refuses the dispatch.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

MAX_THREADS_PER_THREADGROUP = 1024


def max_threads_for(declared: int) -> int:
    """The pipeline's maxTotalThreadsPerThreadgroup for a kernel declaring `declared` (0: none)."""
    return min(declared, MAX_THREADS_PER_THREADGROUP) if declared > 0 else MAX_THREADS_PER_THREADGROUP


def launch_geometry(name: str, args: Sequence[Any], threads, group_size, max_threads: int = MAX_THREADS_PER_THREADGROUP,
                    declared: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`max_threads`: the kernel's max_threads_per_threadgroup; `declared`: its
    [[max_total_threads_per_threadgroup(N)]] N (0: none), for the message."""
    grid = _dims(name, "threads", threads if threads is not None else _default_threads(name, args))
    if group_size is None:
        group = (min(grid[0], max_threads),) if len(grid) == 1 else (max_threads,) + (1,) * (len(grid) - 1)
    else:
        group = _dims(name, "group_size", group_size)
    if len(group) != len(grid):
        raise ValueError(f"{name}: group_size: expected {len(grid)} dimension(s) like threads={grid}, got {group}")
    total = 1
    for g in group:
        total *= g
    if total > max_threads:
        why = (f"the kernel declares [[max_total_threads_per_threadgroup({declared})]]" if declared
               else "the device limit")
        raise ValueError(
            f"{name}: group_size: expected at most {max_threads} threads per threadgroup "
            f"(max_threads_per_threadgroup: {why}), got {group} = {total}; torch does not check this and "
            "Metal's validation refuses the dispatch (without validation the result is undefined)"
        )
    return _pad3(grid), _pad3(group)


def _default_threads(name: str, args: Sequence[Any]) -> int:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.numel()
    raise ValueError(f"{name}: threads: expected threads= when no argument is a tensor")


def _dims(name: str, what: str, value) -> tuple[int, ...]:
    dims = (value,) if isinstance(value, int) else tuple(value) if isinstance(value, Sequence) else None
    if dims is not None and 0 in dims:
        # torch does not check: it hands the size to dispatchThreads, where a 0 is undefined
        # (Metal's API validation aborts; without it the launch may do nothing or fault).
        raise ValueError(
            f"{name}: {what}: {value!r} contains 0: torch.mps.compile_shader passes it to Metal unchecked and "
            "the result is undefined; answer empty problems on the host instead of launching"
        )
    if dims is None or not 1 <= len(dims) <= 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise ValueError(f"{name}: {what}: expected a positive int or 1-3 positive ints, got {value!r}")
    return dims


def _pad3(dims: tuple[int, ...]) -> tuple[int, int, int]:
    return tuple(dims) + (1,) * (3 - len(dims))  # type: ignore[return-value]
