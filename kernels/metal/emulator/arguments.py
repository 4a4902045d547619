"""Python arguments -> the buffer pointers a kernel sees, by torch.mps.compile_shader's rules.

Argument i binds ``[[buffer(i)]]``. A tensor binds at its storage offset (strides are ignored,
as on Metal). A Python float is a 4-byte float; a Python int is an 8-byte int64 unless
``arg_casts`` says otherwise; lists become int64/float32 arrays (a list of tensors becomes an
array of their addresses). Mismatches that Metal would silently accept, such as an int64 read
through a ``constant uint&``, are reported as EmulatorWarning.
"""

from __future__ import annotations

import ctypes
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .kernel_signatures import BUFFER, Kernel

_CASTS = {
    "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "uint8": torch.uint8, "bool": torch.bool,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "bfloat": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
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
    expected = sorted(buffers)
    if expected != list(range(len(args))):
        raise ValueError(
            f"{kernel.name}: expected {len(expected)} argument(s) for buffers {expected}, got {len(args)}"
        )
    casts = _normalize_casts(arg_casts, len(args), kernel.name)
    bound = BoundArguments((ctypes.c_void_p * max(1, len(args)))())
    for i, arg in enumerate(args):
        tensor = _as_tensor(arg, casts.get(i), kernel.name, i)
        _check_size(kernel.name, i, arg, tensor, *buffers[i])
        bound.keepalive.append(tensor)
        bound.pointers[i] = tensor.data_ptr() if tensor.numel() else None
    return bound


def _normalize_casts(arg_casts, nargs: int, name: str) -> dict[int, torch.dtype]:
    if arg_casts is None:
        return {}
    if isinstance(arg_casts, (str, torch.dtype)):
        return {i: _cast_dtype(arg_casts, name, i) for i in range(nargs)}
    if not isinstance(arg_casts, Mapping):
        raise TypeError(f"{name}: arg_casts: expected a dtype name or a dict {{index: dtype}}, got {type(arg_casts).__name__}")
    out = {}
    for i, cast in arg_casts.items():
        if not isinstance(i, int) or not 0 <= i < nargs:
            raise ValueError(f"{name}: arg_casts: expected argument indices in [0, {nargs}), got {i!r}")
        out[i] = _cast_dtype(cast, name, i)
    return out


def _cast_dtype(cast, name: str, i: int) -> torch.dtype:
    if isinstance(cast, torch.dtype):
        return cast
    if cast in _CASTS:
        return _CASTS[cast]
    raise ValueError(f"{name}: arg_casts[{i}]: expected one of {sorted(_CASTS)} or a torch.dtype, got {cast!r}")


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
    raise TypeError(f"{name}: argument {i}: expected a tensor, int, float or list, got {type(arg).__name__}")


def _list_tensor(arg, cast, name: str, i: int) -> torch.Tensor:
    if arg and all(isinstance(x, torch.Tensor) for x in arg):
        return torch.tensor([_as_tensor(x, None, name, i).data_ptr() for x in arg], dtype=torch.int64)
    if not all(isinstance(x, (bool, int, float)) for x in arg):
        raise TypeError(f"{name}: argument {i}: expected a list of numbers or of tensors, got {arg!r}")
    default = torch.float32 if any(isinstance(x, float) for x in arg) else torch.int64
    return torch.tensor(list(arg), dtype=cast or default)


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
