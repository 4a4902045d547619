"""Per-launch cost counters of a counted build, and recording them across launches.

    with record_costs() as launches:      # compiles inside are counted builds
        lib = compile_shader(source)
        lib.my_kernel(out, x, threads=..., group_size=...)
    launches[0].values["device_bytes_read"], launches[0].simdgroup_mmas

Every counter is a total over all threads (or threadgroups) of one launch:

| counter | definition |
|---|---|
| `device_bytes_read` / `_written` | bytes loaded from / stored to `device` pointers by all threads (atomics: both) |
| `constant_bytes_read` | bytes loaded through `constant` pointers (launch parameters, `constant` buffers) |
| `threadgroup_bytes_read` / `_written` | the same for `threadgroup` memory |
| `mma_lane_calls` | lane calls of `simdgroup_multiply_accumulate`; `simdgroup_mmas` = this / 32 (one 8x8x8 product, 512 FMAs, per simdgroup) |
| `float_ops` | floating-point arithmetic, comparisons and math functions outside MMAs, per element (an FMA is one) |
| `float_conversions` | conversions between float types and between float and integer |
| `int64_ops` | arithmetic, logic, shifts and comparisons on 64-bit integers |
| `barriers` | `threadgroup_barrier`s, counted once per threadgroup that passes one (not per thread) |
| `simd_collectives` | simd-group collectives completed (MMAs, shuffles, reductions), once per simdgroup |
| `threadgroups`, `threads` | launched |
| `peak_threadgroup_bytes` | the most threadgroup memory one threadgroup allocated (declarations reached, with alignment) |

The first nine come from the instrumented IR (cost_instrument.py says exactly which instructions
count, and after which optimisation); the rest from the scheduler. What they are not: time.
Registers, instruction issue, caches, bank conflicts and latency hiding are not modelled.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
from dataclasses import dataclass
from typing import Iterator

from .cost_instrument import COUNTED
from .targets import emulate

SCHEDULER_COUNTED = ("barriers", "simd_collectives", "threadgroups", "threads", "peak_threadgroup_bytes")
COUNTERS = COUNTED + SCHEDULER_COUNTED  # runtime.h's Counter order
MMA_FLOPS = 2 * 8 * 8 * 8  # one simdgroup 8x8x8 multiply-accumulate


@dataclass(frozen=True)
class LaunchCounters:
    kernel: str
    threads_per_threadgroup: int
    values: dict

    @property
    def simdgroup_mmas(self) -> int:
        return self.values["mma_lane_calls"] // 32

    @property
    def mma_flops(self) -> int:
        return self.simdgroup_mmas * MMA_FLOPS

    def __getitem__(self, name: str) -> int:
        return self.simdgroup_mmas if name == "simdgroup_mmas" else self.values[name]


_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("mslemu_cost_recording", default=None)


def read_launch(dll: ctypes.CDLL, kernel: str, group: tuple[int, ...]) -> LaunchCounters:
    """The counters of `dll`'s last launch (and add them to the active recording, if any)."""
    raw = (ctypes.c_int64 * len(COUNTERS))()
    n = dll.mslemu_cost_read(raw)
    if n != len(COUNTERS):
        raise RuntimeError(f"the emulator runtime keeps {n} cost counters, cost_counters.py names {len(COUNTERS)}")
    threads = 1
    for extent in group:
        threads *= int(extent)
    launch = LaunchCounters(kernel, threads, dict(zip(COUNTERS, list(raw))))
    recording = _RECORDING.get()
    if recording is not None:
        recording.append(launch)
    return launch


@contextlib.contextmanager
def record_costs() -> Iterator[list[LaunchCounters]]:
    """Compiles inside the block are counted builds; every counted launch inside is appended."""
    launches: list[LaunchCounters] = []
    token = _RECORDING.set(launches)
    try:
        with emulate(counted=True):
            yield launches
    finally:
        _RECORDING.reset(token)


def total(launches: list[LaunchCounters], name: str) -> int:
    """A counter summed over launches (the peak: its maximum)."""
    values = [launch[name] for launch in launches]
    return max(values, default=0) if name == "peak_threadgroup_bytes" else sum(values)
