"""The object `compile_shader` returns: kernels looked up by name and called like torch's.

    lib = compile_shader(source)
    lib.my_kernel(out, x, 3, threads=n, group_size=256)

Extra keyword arguments that only the emulator accepts: `schedule=` (see schedules.py) and
`poison=` (fill threadgroup memory with 0xFF bytes, on by default).
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from typing import Any

from . import arguments, compiler, cost_counters, geometry, schedules
from .kernel_signatures import Kernel
from .targets import current_target


class EmulatorRuntimeError(RuntimeError):
    """A kernel failed while running under the emulator (barrier divergence, memory limit...)."""


def default_workers() -> int:
    """OS threads that run threadgroups: MSLEMU_WORKERS, else 1 on machines with <= 2 CPUs (two
    workers measured no faster there: 95-157 ms vs 96-112 ms on the flash benchmark), else one
    per CPU up to 8."""
    env = os.environ.get("MSLEMU_WORKERS")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"MSLEMU_WORKERS: expected a positive integer, got {env!r}")
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1 if cpus <= 2 else min(8, cpus)


class EmulatedLibrary:
    """A compiled MSL library; attribute access returns its kernels. `target`, `msl_version` and
    `fast_math` say what it was compiled as (targets.py: MSLEMU_MACOS, MSLEMU_TORCH,
    PYTORCH_MPS_FAST_MATH or `emulate(...)` at the time of the compile)."""

    is_emulated = True

    def __init__(self, source: str):
        if not isinstance(source, str):
            raise TypeError(f"compile_shader: source: expected str, got {type(source).__name__}")
        self.target = current_target()
        self.msl_version, self.fast_math = self.target.msl_version, self.target.fast_math
        path, kernels = compiler.build(source, self.target)
        self._dll = ctypes.CDLL(str(path))
        self._dll.mslemu_dispatch.restype = ctypes.c_int
        self._dll.mslemu_dispatch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                              ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_int]
        self._dll.mslemu_last_error.restype = ctypes.c_char_p
        self._dll.mslemu_last_warnings.restype = ctypes.c_char_p
        self._kernels = {k.name: EmulatedKernel(self._dll, k, self.target.counted) for k in kernels}

    def __getattr__(self, name: str) -> "EmulatedKernel":
        kernels = self.__dict__.get("_kernels", {})
        if name in kernels:
            return kernels[name]
        raise AttributeError(f"no kernel named {name!r} in this library; kernels: {sorted(kernels)}")

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._kernels))


class EmulatedKernel:
    """One kernel; calling it launches it over the grid, writing results into the tensors."""

    thread_execution_width = 32
    static_thread_group_memory_length = 0  # unknown before running: threadgroup arrays are allocated lazily

    def __init__(self, dll: ctypes.CDLL, kernel: Kernel, counted: bool = False):
        self._dll, self._kernel, self._counted = dll, kernel, counted
        self.last_counters = None  # a counted build's LaunchCounters of the last launch
        self._entry = ctypes.cast(getattr(dll, f"mslemu_kernel_{kernel.symbol}"), ctypes.c_void_p).value
        self._sizes = self._describe()
        limit = getattr(dll, f"mslemu_max_threads_{kernel.symbol}")
        limit.restype = ctypes.c_longlong
        # [[max_total_threads_per_threadgroup(N)]] as clang evaluated it (0: not declared)
        self.declared_max_threads = int(limit())
        # what torch reports: the pipeline's maxTotalThreadsPerThreadgroup, N capped at 1024
        self.max_threads_per_threadgroup = geometry.max_threads_for(self.declared_max_threads)

    def _describe(self) -> list[tuple[int, bool, bool]]:
        n = len(self._kernel.params)
        out = (ctypes.c_int64 * max(3, 3 * n))()
        getattr(self._dll, f"mslemu_params_{self._kernel.symbol}")(out)
        return [(out[3 * i], bool(out[3 * i + 1]), bool(out[3 * i + 2])) for i in range(n)]

    def __call__(self, *args: Any, threads=None, group_size=None, arg_casts=None, schedule: str | None = None,
                 poison: bool = True, seed: int = 0) -> None:
        name = self._kernel.name
        bound = arguments.bind(self._kernel, self._sizes, args, arg_casts)
        grid, group = geometry.launch_geometry(name, args, threads, group_size, self.max_threads_per_threadgroup,
                                               self.declared_max_threads)
        _take_workers(self._dll)
        rc = self._dll.mslemu_dispatch(
            self._entry, ctypes.addressof(bound.pointers), (ctypes.c_uint32 * 3)(*grid), (ctypes.c_uint32 * 3)(*group),
            schedules.schedule_id(schedule), seed, default_workers(), int(poison),
        )
        for message in (self._dll.mslemu_last_warnings() or b"").decode().splitlines():
            warnings.warn(f"{name}: {message}", arguments.EmulatorWarning, stacklevel=2)
        if rc != 0:
            raise EmulatorRuntimeError(f"{name}: {self._dll.mslemu_last_error().decode()}")
        if self._counted:
            self.last_counters = cost_counters.read_launch(self._dll, name, group)

    def __repr__(self) -> str:
        return f"<emulated Metal kernel {self._kernel.name}>"


_worker_owner: list = [None]  # the library whose runtime copy last kept worker fibers
_worker_lock = threading.Lock()


def _take_workers(dll: ctypes.CDLL) -> None:
    """Before `dll` launches, the library that launched last drops its worker fibers: each library
    links its own runtime, and every kept fiber stack costs two of the process's limited mappings
    (vm.max_map_count, 65530 by default), which hundreds of loaded variants would exhaust."""
    with _worker_lock:
        previous, _worker_owner[0] = _worker_owner[0], dll
    if previous is not None and previous is not dll:
        previous.mslemu_release_workers()


def compile_shader(source: str) -> EmulatedLibrary:
    """Compile MSL `source` for the CPU emulator: the same call as torch.mps.compile_shader."""
    return EmulatedLibrary(source)
