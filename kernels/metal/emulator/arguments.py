"""Python arguments -> the buffer pointers a kernel sees, by torch.mps.compile_shader's rules.

Read from torch's `_mps_MetalKernel.__call__` and its `OptionalArgCaster`
(torch/csrc/mps/Module.cpp) and `MetalKernelFunction::setArg` (OperationUtils.mm):

- Python argument i is bound to buffer index i, whatever the kernel declares: a kernel with
  `[[buffer(0)]]` and `[[buffer(2)]]` needs three arguments, the second binding the unused index 1.
  Fewer arguments than the highest declared index leave a buffer unbound (undefined on Metal: an
  error here); arguments past it bind indices the kernel does not read (accepted, with a warning).
- A tensor binds at its storage offset (strides are ignored, as on Metal). A Python float is a
  4-byte float; a Python int (or bool) an 8-byte int64, unless ``arg_casts`` says otherwise.
- A list or tuple: empty is a RuntimeError; its first element decides the type: int -> int64
  array (a float later is a RuntimeError: pybind11 will not cast it to int64), float -> float32
  array (ints later convert), tensor -> array of their addresses (all must be tensors).
  Anything else is a RuntimeError, as is an argument of another type.
- ``arg_casts``: a string for every scalar/list argument or a dict {index: string}; the strings
  torch knows are fp16, bf16, int32, int16, int8 and uint8 (others are a RuntimeError on a Mac,
  so here too). Tensors are never cast.
Mismatches that Metal would silently accept, such as an int64 read through a ``constant uint&``,
are reported as EmulatorWarning.
"""

from __future__ import annotations

import ctypes
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .kernel_signatures import BUFFER, Kernel

_CASTS = {  # exactly the names torch's OptionalArgCaster accepts
    "fp16": torch.float16, "bf16": torch.bfloat16, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8,
}


class EmulatorWarning(UserWarning):
    """Something Metal would accept silently but is probably a bug (or an emulator approximation)."""


@dataclass
class BoundArguments:
    pointers: ctypes.Array  # void*[n_buffers], indexed by buffer index
    keepalive: list = field(default_factory=list)  # tensors the pointers point into


def bind(kernel: Kernel, sizes: Sequence[tuple[int, bool, bool]], args: Sequence[Any],
         arg_casts: str | Mapping[int, Any] | None) -> BoundArguments:
    """Bind `args` to `kernel`'s buffer parameters; `sizes` is the compiled description of each
    parameter (pointee bytes, is a reference, pointee is a plain scalar)."""
    buffers = {p.buffer: (p, sizes[i]) for i, p in enumerate(kernel.params) if p.kind == BUFFER}
    _check_count(kernel.name, sorted(buffers), len(args))
    casts = _normalize_casts(arg_casts, len(args), kernel.name)
    bound = BoundArguments((ctypes.c_void_p * max(1, len(args)))())
    for i, arg in enumerate(args):
        tensor = _as_tensor(arg, casts.get(i), kernel.name, i)
        if i in buffers:
            _check_size(kernel.name, i, arg, tensor, *buffers[i])
        bound.keepalive.append(tensor)
        bound.pointers[i] = tensor.data_ptr() if tensor.numel() else None
    return bound


def _check_count(name: str, indices: list[int], nargs: int) -> None:
    missing = [i for i in indices if i >= nargs]
    if missing:
        raise ValueError(
            f"{name}: expected at least {indices[-1] + 1} argument(s) (Python argument i binds buffer(i); "
            f"declared buffers {indices}), got {nargs}: buffer(s) {missing} would be unbound, which is "
            "undefined on Metal"
        )
    extra = [i for i in range(nargs) if i > (indices[-1] if indices else -1)]
    if extra:
        warnings.warn(
            f"{name}: argument(s) {extra} bind buffer indices the kernel does not declare (declared: {indices}); "
            "torch binds them and the kernel never reads them",
            EmulatorWarning,
            stacklevel=4,
        )


def _normalize_casts(arg_casts, nargs: int, name: str) -> dict[int, torch.dtype]:
    if arg_casts is None:
        return {}
    if isinstance(arg_casts, str):
        return {i: _cast_dtype(arg_casts, name, i) for i in range(nargs)}
    if not isinstance(arg_casts, Mapping):  # torch: "Unexpected caster arg type" (a torch.dtype too)
        raise RuntimeError(f"{name}: arg_casts: expected a cast name or a dict {{index: name}}, got {type(arg_casts).__name__}")
    out = {}
    for i, cast in arg_casts.items():
        if not isinstance(i, int) or not 0 <= i < nargs:
            raise ValueError(f"{name}: arg_casts: expected argument indices in [0, {nargs}), got {i!r}")
        out[i] = _cast_dtype(cast, name, i)
    return out


def _cast_dtype(cast, name: str, i: int) -> torch.dtype:
    if isinstance(cast, str) and cast in _CASTS:
        return _CASTS[cast]
    # torch: "Unsupported cast instruction" (a RuntimeError), and only these names
    raise RuntimeError(f"{name}: arg_casts[{i}]: expected one of {sorted(_CASTS)} (torch's names), got {cast!r}")


def _as_tensor(arg, cast: torch.dtype | None, name: str, i: int) -> torch.Tensor:
    if isinstance(arg, torch.Tensor):
        if arg.device.type != "cpu":
            raise ValueError(f"{name}: argument {i}: the emulator runs on CPU tensors, got a tensor on {arg.device}")
        return arg  # casts apply to Python scalars, as in torch
    if isinstance(arg, (bool, int, float)):
        default = torch.float32 if isinstance(arg, float) else torch.int64
        return torch.tensor([arg], dtype=cast or default)
    if isinstance(arg, (list, tuple)):
        return _list_tensor(arg, cast, name, i)
    raise RuntimeError(f"{name}: argument {i}: expected a tensor, int, float or list, got {type(arg).__name__} "
                       "(torch: Unsupported argument type)")


def _list_tensor(arg, cast, name: str, i: int) -> torch.Tensor:
    """torch's rule: the first element picks the array type, and the rest must cast to it."""
    if not arg:
        raise RuntimeError(f"{name}: argument {i}: Empty list/tuple can not be an argument to metal kernel")
    first = arg[0]
    if isinstance(first, torch.Tensor):
        kind, ok = "tensors", all(isinstance(x, torch.Tensor) for x in arg)
    elif isinstance(first, int):  # bool too, as in Python
        kind, ok = "ints (int64)", all(isinstance(x, int) for x in arg)
    elif isinstance(first, float):
        kind, ok = "floats (float32)", all(isinstance(x, (int, float)) for x in arg)
    else:
        raise RuntimeError(f"{name}: argument {i}: a list of {type(first).__name__} (torch: Unexpected argument types); "
                           "expected ints, floats or tensors")
    if not ok:
        raise RuntimeError(
            f"{name}: argument {i}: mixed list {list(arg)!r}: its first element makes it a list of {kind}, and torch "
            "cannot cast the rest to that (pybind11 refuses e.g. a float in an int64 list); make every element "
            "one type"
        )
    if kind == "tensors":
        return torch.tensor([_as_tensor(x, None, name, i).data_ptr() for x in arg], dtype=torch.int64)
    default = torch.float32 if isinstance(first, float) else torch.int64
    return torch.tensor([float(x) for x in arg] if default == torch.float32 else list(arg), dtype=cast or default)


def _check_size(name: str, i: int, arg, tensor: torch.Tensor, param, size: tuple[int, bool, bool]) -> None:
    pointee, is_reference, is_scalar = size
    if not is_scalar or pointee == 0:
        return
    given = tensor.element_size()
    if given == pointee:
        return
    what = f"Python {type(arg).__name__} bound as {tensor.dtype}" if not isinstance(arg, torch.Tensor) else f"a {tensor.dtype} tensor"
    hint = f" Pass arg_casts={{{i}: 'int32'}}." if isinstance(arg, int) and pointee == 4 else ""
    if isinstance(arg, torch.Tensor) and not is_reference:
        hint = " The kernel will reinterpret its bytes."
    warnings.warn(
        f"{name}: argument {i} is {what} ({given} bytes per element) but buffer({param.buffer}) is declared "
        f"`{param.text}` ({pointee}-byte elements); Metal reads the bytes as declared.{hint}",
        EmulatorWarning,
        stacklevel=4,
    )
