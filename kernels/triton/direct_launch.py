"""Relaunching a compiled Triton kernel without Triton's per-call binding.

`JITFunction.run` binds and specializes every argument on every call (about 46 arguments for our
kernels: tens of microseconds of host time, most of a decode layer's cost on the H200). Its result
only depends on what Triton specializes on, so `DirectLauncher` keys the compiled kernel by exactly
those properties and launches it through `CompiledKernel[grid](*args)`:

- a tensor: its dtype and whether its data pointer is 16-byte aligned;
- an int: whether it equals 1, whether it is a multiple of 16, and whether it fits 32, 64 or more bits;
- a float: nothing (Triton passes every Python float as fp32);
- a constexpr, a bool, None or anything else: the value itself.

A key finer than Triton's only costs an extra miss; a miss goes through Triton's own `fn[grid](...)`,
which compiles or finds the kernel and returns it. Triton's internals stop at this module: the
compiled kernel's `[grid]` launcher (which calls Triton's launch hooks, as the JIT path does, so
profilers still see every launch), the JIT function's parameter list and its pre-run hooks (a JIT
function that has any always takes Triton's own path). `MFA_TRITON_DIRECT_LAUNCH=0`
turns the fast path off; `tests/triton/test_direct_launch.py` checks it on a GPU against the JIT.
"""

from __future__ import annotations

import inspect

import torch

from ..environment import raw, reader
from ..launch import BoundedMemo  # a full table starts over

_I32_MIN, _I32_MAX, _I64_MIN, _I64_MAX = -(2**31), 2**31 - 1, -(2**63), 2**63 - 1


_read_switch = reader("MFA_TRITON_DIRECT_LAUNCH")
_OFF = raw("0")


def _enabled() -> bool:
    return _read_switch()[0] != _OFF


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
        compiled, tail = entry
        compiled[_grid3(grid)](*args, *tail)

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
        compiled, tail = entry
        return compiled[_grid3(grid)], tail

    def _entry(self, device, grid, args, kwargs):
        """The (compiled kernel, trailing arguments) for Triton's classes of this call, launching it: from
        the class table, else through the JIT (which compiles or finds it). None when it cannot be kept."""
        cut = self._first_constexpr
        key = (device, _plain_key(args[:cut]), args[cut:], tuple(kwargs.items()))
        entry = self._by_class.get(key)
        if entry is not None:
            compiled, tail = entry
            compiled[_grid3(grid)](*args, *tail)
            return entry
        return self._compile(key, grid, args, kwargs)

    def _compile(self, key, grid, args, kwargs):
        compiled = self.fn[grid](*args, **kwargs)
        if hasattr(compiled, "result"):  # an asynchronous compile's future
            compiled = compiled.result()
        names = self._names[len(args):]
        if not hasattr(compiled, "__getitem__") or any(n not in kwargs and n not in self._defaults for n in names):
            return None  # nothing to reuse: the next call binds again
        entry = (compiled, tuple(kwargs[n] if n in kwargs else self._defaults[n] for n in names))
        return self._by_class.keep(key, entry)


def tensor_classes(tensors) -> tuple:
    """What Triton specializes a tensor argument on: its dtype and whether its address is 16-byte aligned."""
    return tuple([(t.dtype, not (t.data_ptr() & 15)) for t in tensors])


def _grid3(grid) -> tuple:
    grid = tuple(grid)
    return grid + (1,) * (3 - len(grid))
