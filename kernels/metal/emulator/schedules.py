"""Execution schedules, and the two-schedule check that turns a missing barrier into a failure.

Lockstep schedules (``forward``, ``reverse``, ``random``) run every lane of the threadgroup up to
its next barrier or simd collective in turn; ``sg-*`` schedules run one simd-group all the way
to its next threadgroup barrier before the next starts (maximal skew between simd-groups).
A correct kernel gives bitwise-identical results under all of them; a kernel that reads
threadgroup memory another simd-group writes without a barrier in between does not.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

# Order matches mslemu_rt::Schedule in runtime/runtime.h.
SCHEDULES = ("forward", "reverse", "random", "sg-forward", "sg-reverse", "sg-random")
TWO_SCHEDULES = ("forward", "sg-random")


def schedule_id(name: str | None) -> int:
    name = name or os.environ.get("MSLEMU_SCHEDULE") or "forward"
    if name not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {name!r}")
    return SCHEDULES.index(name)


def run_two_schedules(lib, name: str, args: Sequence[Any], *, threads=None, group_size=None, arg_casts=None,
                      outputs: Sequence[Any] | None = None, schedules: Sequence[str] = TWO_SCHEDULES) -> None:
    """Run kernel `name` of `lib` under two schedules from the same inputs and assert that the
    `outputs` (tensors, or indices into `args`; default: every tensor argument) are bitwise equal.

    The arguments are left holding the last run's results. On real Metal (`lib` from
    torch.mps.compile_shader) there are no schedules: the kernel runs once.
    """
    kernel = getattr(lib, name)
    launch = dict(threads=threads, group_size=group_size, arg_casts=arg_casts)
    launch = {k: v for k, v in launch.items() if v is not None}
    if not getattr(lib, "is_emulated", False):
        kernel(*args, **launch)
        return
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    checked = _outputs(args, outputs)
    initial = [t.clone() for t in tensors]
    results = []
    for n, schedule in enumerate(schedules):
        if n:
            for t, saved in zip(tensors, initial):
                t.copy_(saved)
        kernel(*args, schedule=schedule, **launch)
        results.append([t.clone() for t in checked])
    for n in range(1, len(schedules)):
        _assert_bitwise_equal(name, schedules[0], schedules[n], results[0], results[n])


def _outputs(args: Sequence[Any], outputs) -> list[torch.Tensor]:
    if outputs is None:
        return [a for a in args if isinstance(a, torch.Tensor)]
    picked = []
    for o in outputs:
        t = args[o] if isinstance(o, int) else o
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"outputs: expected tensors or indices of tensor arguments, got {o!r}")
        picked.append(t)
    return picked


def _assert_bitwise_equal(name, first, second, a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for i, (x, y) in enumerate(zip(a, b)):
        same = torch.equal(_bits(x), _bits(y))
        if same:
            continue
        differ = (_bits(x) != _bits(y)).reshape(-1)
        diff = (x.double() - y.double()).abs().nan_to_num(float("inf"))
        raise AssertionError(
            f"{name}: output {i} differs between schedules {first!r} and {second!r} in "
            f"{int(differ.sum())} of {differ.numel()} elements (max abs difference {diff.max().item():.3g}): "
            "a missing threadgroup_barrier or simdgroup_barrier, or a race on device memory"
        )


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes, so NaN == NaN and -0.0 != 0.0."""
    return t.contiguous().reshape(-1).view(torch.uint8)
