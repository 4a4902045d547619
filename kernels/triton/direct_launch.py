"""Relaunching a compiled Triton kernel without Triton's per-call binding.

`JITFunction.run` binds and specializes every argument on every call (about 46 arguments for our
kernels: tens of microseconds of host time, most of a decode layer's cost on the H200). Its result
only depends on what Triton specializes on, so `DirectLauncher` keys the compiled kernel by exactly
those properties and launches it through the compiled kernel's C launcher (`_Fire`):

- a tensor: its dtype and whether its data pointer is 16-byte aligned;
- an int: whether it equals 1, whether it is a multiple of 16, and whether it fits 32, 64 or more bits;
- a float: nothing (Triton passes every Python float as fp32);
- a constexpr, a bool, None or anything else: the value itself.

A key finer than Triton's only costs an extra miss; a miss goes through Triton's own `fn[grid](...)`,
which compiles or finds the kernel and returns it. Triton's internals stop at this module: the
compiled kernel's C launcher and `[grid]` runner, the runtime's launch hooks, the JIT function's
parameter list and its pre-run hooks (a JIT function that has any always takes Triton's own path).
`MFA_TRITON_DIRECT_LAUNCH=0` turns the fast path off; `tests/triton/test_direct_launch.py` checks it
on a GPU against the JIT.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from ..environment import raw, reader
from ..launch import BoundedMemo  # a full table starts over

_I32_MIN, _I32_MAX, _I64_MIN, _I64_MAX = -(2**31), 2**31 - 1, -(2**63), 2**63 - 1


_read_switch = reader("MFA_TRITON_DIRECT_LAUNCH")
_OFF = raw("0")


def _enabled() -> bool:
    return _read_switch()[0] != _OFF


class _Fire:
    """Launches one compiled kernel. `CompiledKernel[grid](*args)` builds a runner closure, reads the current device
    and stream through Triton's driver proxy and builds launch metadata for the launch hooks on every call (about
    2.6 of its 9.6 µs on the H100's host, `benchmarks/triton/host_profile.py`). With no launch hook installed (both
    hook chains empty) this calls the C launcher that the runner would call, with the stream of the device the
    caller already read. An installed hook (a profiler such as Proton), or a Triton whose compiled kernel or
    runtime knobs are not laid out as 3.4-3.6 lay them out, gets the runner itself, so hooks see every launch."""

    __slots__ = ("compiled", "raw")

    def __init__(self, compiled):
        self.compiled = compiled
        self.raw = _raw_launcher(compiled)

    def __call__(self, grid3: tuple, device: int, args: tuple, tail: tuple) -> None:
        raw = self.raw
        if raw is None or not _hooks_idle():
            self.compiled[grid3](*args, *tail)
            return
        run, function, packed, stream_of = raw
        run(grid3[0], grid3[1], grid3[2], stream_of(device), function, packed, None, None, None, *args, *tail)

    def bound(self, grid3: tuple, device: int):
        """A function of the kernel's arguments that launches on `grid3` on CUDA device `device`, which the
        caller guarantees is the current one at each call."""
        runner, raw = self.compiled[grid3], self.raw
        if raw is None:
            return runner
        run, function, packed, stream_of = raw
        x, y, z = grid3

        def launch(*args):
            if _hooks_idle():
                run(x, y, z, stream_of(device), function, packed, None, None, None, *args)
            else:
                runner(*args)

        return launch


def _raw_launcher(compiled):
    """(C launcher, function handle, packed metadata, stream getter) of a compiled kernel, or None where this
    Triton does not have them (the runner then serves)."""
    found = _runtime()
    if found is None:
        return None
    try:
        compiled[(1, 1, 1)]  # loads the module and builds the launcher (Triton's _init_handles); launches nothing
        return compiled.run, compiled.function, compiled.packed_metadata, found[1]
    except AttributeError:
        return None


def _triton_runtime():
    """(triton.knobs.runtime, the driver's current-stream getter) where the knobs hold both launch hooks (Triton
    3.4+), else None."""
    try:
        from triton import knobs
        from triton.runtime.driver import driver

        runtime, stream_of = getattr(knobs, "runtime", None), driver.active.get_current_stream
    except (ImportError, AttributeError, RuntimeError):  # RuntimeError: no active driver (no GPU)
        return None
    if not all(hasattr(runtime, name) for name in ("launch_enter_hook", "launch_exit_hook")):
        return None
    return runtime, stream_of


def _idle(hook) -> bool:
    """A launch hook that calls nothing: None (as a caller may assign) or an empty hook chain."""
    if hook is None:
        return True
    calls = getattr(hook, "calls", None)
    return type(calls) is list and not calls


def _hooks_idle() -> bool:
    found = _runtime()
    if found is None:
        return False
    runtime = found[0]
    return _idle(runtime.launch_enter_hook) and _idle(runtime.launch_exit_hook)


def _runtime():
    """_triton_runtime(), looked up once (at the first launch: importing Triton at import time is slow)."""
    if not _RUNTIME:
        _RUNTIME.append(_triton_runtime())
    return _RUNTIME[0]


_RUNTIME: list = []


@contextlib.contextmanager
def through_runner():
    """Launch through CompiledKernel[grid]'s runner inside the block, as an installed hook does (for benchmarks
    that compare the two ways in one process: benchmarks/triton/host_overhead.py)."""
    saved = list(_RUNTIME)
    _RUNTIME[:] = [None]
    try:
        yield
    finally:
        _RUNTIME[:] = saved


def _plain_key(args) -> tuple:
    """Triton's specialization classes of positional arguments that are not constexprs (see the
    module docstring); bool is tested before int because it is one."""
    return tuple([
        (a.dtype, not (a.data_ptr() & 15)) if isinstance(a, torch.Tensor)
        else (a == 1, not (a & 15), 0 if _I32_MIN <= a <= _I32_MAX else 1 if _I64_MIN <= a <= _I64_MAX else 2)
        if type(a) is int
        else float if type(a) is float
        else a
        for a in args
    ])


class DirectLauncher:
    """`launcher[grid](*args, **constexprs)` as `jit_fn[grid](...)`, minus the per-call binding once
    a kernel is compiled for that kind of call. Anything this module cannot prove it handles
    (interpreter mode, CPU tensors, pre-run hooks, a Triton without these internals) goes to `jit_fn`."""

    def __init__(self, jit_fn):
        self.fn = jit_fn
        params = getattr(jit_fn, "params", None)
        self._usable = params is not None and hasattr(jit_fn, "pre_run_hooks")
        if self._usable:
            self._names = [p.name for p in params]
            self._defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
            constexpr = [n for n, p in enumerate(params) if p.is_constexpr]
            self._first_constexpr = constexpr[0] if constexpr else len(params)
        self._by_class, self._by_value, self._by_known = BoundedMemo(), BoundedMemo(), BoundedMemo()

    def forget(self) -> None:
        """Drop every remembered kernel: a caller whose plans changed under the same keys (a benchmark that
        swaps block tables) starts over."""
        for table in (self._by_class, self._by_value, self._by_known):
            table.clear()

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args: tuple, kwargs: dict, known=None, tensors: int = 0):
        """Launch `args`/`kwargs` on `grid`. A caller that already holds a key of its own for the kind of
        call (a launch plan) passes it as `known`, with its tensors first in `args` (`tensors` of them):
        `known` must determine every other argument and every keyword exactly, floats as Python floats
        (whose values Triton ignores). The lookup then costs one small tuple."""
        first = args[0] if args else None
        if (not self._usable or callable(grid) or not isinstance(first, torch.Tensor) or first.device.type != "cuda"
                or self.fn.pre_run_hooks or not _enabled()):
            return self.fn[grid](*args, **kwargs)
        device = torch.cuda.current_device()
        if known is not None:
            table = self._by_known
            key = (device, known, tensor_classes(args[:tensors]))
        else:
            # By value (ints and floats as they are: a repeat of the same kind of call costs one tuple),
            # then by Triton's classes in _entry (a cache that grew by a token: new lengths, same kernel).
            # The value key refines the class key, so both are sound.
            table = self._by_value
            key = (device, tuple([a if type(a) is not torch.Tensor else (a.dtype, not (a.data_ptr() & 15))
                                  for a in args]), tuple(kwargs.items()))
        entry = table.get(key)
        if entry is None:
            entry = self._entry(device, grid, args, kwargs)  # launches
            if entry is not None:
                table.keep(key, entry)
            return
        fire, tail = entry
        fire(_grid3(grid), device, args, tail)

    def runner(self, device: int, grid, known, classes: tuple):
        """(launch, trailing arguments) of the kernel that `launch(grid, ..., known=known)` kept on CUDA device
        `device` for tensors of these `tensor_classes`, or None (none kept, or the direct path is off).
        `launch(*args, *trailing)` then queues it on the current device's current stream with no key at all:
        for a caller that proves on its own, per call, that its arguments are of that kind (a replay)."""
        if not self._usable or self.fn.pre_run_hooks or not _enabled():
            return None
        entry = self._by_known.get((device, known, classes))
        if entry is None:
            return None
        fire, tail = entry
        return fire.bound(_grid3(grid), device), tail

    def _entry(self, device, grid, args, kwargs):
        """The (compiled kernel, trailing arguments) for Triton's classes of this call, launching it: from
        the class table, else through the JIT (which compiles or finds it). None when it cannot be kept."""
        cut = self._first_constexpr
        key = (device, _plain_key(args[:cut]), args[cut:], tuple(kwargs.items()))
        entry = self._by_class.get(key)
        if entry is not None:
            fire, tail = entry
            fire(_grid3(grid), device, args, tail)
            return entry
        return self._compile(key, grid, args, kwargs)

    def _compile(self, key, grid, args, kwargs):
        compiled = self.fn[grid](*args, **kwargs)
        if hasattr(compiled, "result"):  # an asynchronous compile's future
            compiled = compiled.result()
        names = self._names[len(args):]
        if not hasattr(compiled, "__getitem__") or any(n not in kwargs and n not in self._defaults for n in names):
            return None  # nothing to reuse: the next call binds again
        entry = (_Fire(compiled), tuple(kwargs[n] if n in kwargs else self._defaults[n] for n in names))
        return self._by_class.keep(key, entry)


def tensor_classes(tensors) -> tuple:
    """What Triton specializes a tensor argument on: its dtype and whether its address is 16-byte aligned."""
    return tuple([(t.dtype, not (t.data_ptr() & 15)) for t in tensors])


def _grid3(grid) -> tuple:
    grid = tuple(grid)
    return grid + (1,) * (3 - len(grid))
