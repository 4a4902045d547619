"""Occupancy and roofline estimates from a launch's counters and apple_gpus.py's published figures.

Occupancy: resident threadgroups per core are limited by threadgroup memory (per-core capacity over
the launch's peak threadgroup bytes) and by threads (max resident threads over threads per
threadgroup); simdgroups per core follow. Registers are not counted by the emulator, so a kernel
that needs many registers per thread holds fewer threads than this says (metal-benchmarks: 384 to
3072 threads per core): an upper bound.

Roofline: time >= max(FLOPs / peak FLOP rate, device bytes / memory bandwidth), with FLOPs = 1024
per simdgroup MMA plus the counted float operations (one each), and device bytes = every byte
loaded or stored through `device` pointers (no cache reuse assumed: an upper bound on traffic).
"""

from __future__ import annotations

from dataclasses import dataclass

from .apple_gpus import Chip, GpuFamily
from .cost_counters import LaunchCounters, total


@dataclass(frozen=True)
class Occupancy:
    threadgroups_per_core: int
    simdgroups_per_core: int
    limited_by: str  # "threadgroup memory" or "threads"

    @property
    def describe(self) -> str:
        return f"{self.simdgroups_per_core} simdgroups ({self.threadgroups_per_core} x TG, {self.limited_by})"


def occupancy(peak_threadgroup_bytes: int, threads_per_threadgroup: int, gpu: GpuFamily) -> Occupancy:
    """Resident threadgroups and simdgroups per core for one kernel on one GPU family."""
    by_threads = int(gpu.max_threads_per_core.value) // threads_per_threadgroup
    by_memory = (int(gpu.threadgroup_memory_per_core.value) // peak_threadgroup_bytes
                 if peak_threadgroup_bytes else by_threads)
    groups = min(by_threads, by_memory)
    limit = "threadgroup memory" if by_memory < by_threads else "threads"
    return Occupancy(groups, groups * -(-threads_per_threadgroup // 32), limit)


def launch_occupancy(launch: LaunchCounters, gpu: GpuFamily) -> Occupancy:
    return occupancy(launch["peak_threadgroup_bytes"], launch.threads_per_threadgroup, gpu)


def flops(launches: list[LaunchCounters]) -> int:
    return sum(launch.mma_flops for launch in launches) + total(launches, "float_ops")


def device_bytes(launches: list[LaunchCounters]) -> int:
    return total(launches, "device_bytes_read") + total(launches, "device_bytes_written")


@dataclass(frozen=True)
class Roofline:
    compute_us: float
    memory_us: float

    @property
    def bound(self) -> str:
        return "compute" if self.compute_us >= self.memory_us else "memory"

    @property
    def time_us(self) -> float:
        return max(self.compute_us, self.memory_us)


def roofline(launches: list[LaunchCounters], chip: Chip) -> Roofline:
    return Roofline(flops(launches) / (chip.peak_fp32_tflops.value * 1e6),
                    device_bytes(launches) / (chip.memory_gb_per_s.value * 1e3))
