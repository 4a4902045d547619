"""Checks of scalar arguments (numbers, ints, flags): errors name the argument, what was expected and what came.

The rules every entry point follows:
- a real number (softmax_scale, softcap, dropout_p) is an int, a float, a numpy real scalar, a 0-d real
  tensor (not on meta: it has no value) or anything else `float()` reads, except a bool, a string or a
  complex number: `softcap=True` or `softcap="30"` is a mistake, not 1.0 or 30.0;
- an int (window sides, max_seqlen, group_size, sizes) is anything with `__index__` (int, numpy ints,
  0-d integer tensors), never a bool and never a float: 4.0 or 4.5 is refused rather than truncated;
- a flag (causal) is a bool or something bool-like with exactly two values (numpy bools, 0/1 ints,
  1-element bool tensors): `causal="no"` would otherwise be True.
A value of the wrong kind raises TypeError; a value of the right kind outside its range raises ValueError.
"""

from __future__ import annotations

import numbers
import operator

import torch


def _shown(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-D {value.dtype} tensor on {value.device}"
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} {text[:57]}..."


def is_finite(value) -> bool:
    """math.isfinite that torch.compile traces: under dynamic shapes (or a float argument that changed between
    calls) a float arrives as a SymFloat, which math.isfinite cannot take. x - x is 0 exactly when x is finite."""
    return bool(value - value == 0)


def real_number(value, name: str, expected: str) -> float:
    """float(value) for a real number; TypeError naming `name` for anything else (see the module doc)."""
    if type(value) is float or type(value) is int:  # the common case, first
        return float(value)
    refused = isinstance(value, (bool, str, bytes)) or value is None or _is_bool(value) or (
        isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real))
    if isinstance(value, torch.Tensor):
        refused = value.dim() != 0 or value.dtype == torch.bool or value.is_complex() or value.is_meta
        if not refused and value.requires_grad and torch.is_grad_enabled():
            # read as a float, it would get no gradient: a learnable scale would train as a constant, silently
            raise ValueError(f"{name}: expected a fixed number (no gradient is computed for it), got a tensor "
                             f"requiring grad; pass {name}.detach() or a float")
    if not refused:
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError, NotImplementedError):
            pass
    raise TypeError(f"{name}: expected {expected}, got {_shown(value)}")


def int_like(value, name: str, expected: str, error: type = TypeError) -> int:
    """operator.index(value), refusing bools and floats with `error` (TypeError; ValueError for the
    arguments that always raised it for a wrong kind) naming `name`."""
    if type(value) is int:
        return value
    if not is_bool(value):
        if isinstance(value, torch.Tensor) and value.is_meta:
            raise error(f"{name}: expected {expected}, got {_shown(value)} (a meta tensor has no value)")
        try:
            return operator.index(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise error(f"{name}: expected {expected}, got {_shown(value)}")


def int_at_least(value, name: str, smallest: int, error: type = TypeError) -> int:
    """int_like(value) >= smallest: a wrong kind raises `error`, a smaller int ValueError."""
    number = int_like(value, name, f"an int >= {smallest}", error)
    if number < smallest:
        raise ValueError(f"{name}: expected an int >= {smallest}, got {number}")
    return number


def flag(value, name: str) -> bool:
    """bool(value) for a bool-like value (bool, numpy bool, 0 or 1, a 1-element bool tensor)."""
    if value is True or value is False:
        return value
    if _is_bool(value) or (isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta
                           and value.dtype == torch.bool):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name}: expected a bool, got {_shown(value)}")


def is_bool(value) -> bool:
    """A Python or numpy bool (not 0/1, not a tensor)."""
    return isinstance(value, bool) or _is_bool(value)


def _is_bool(value) -> bool:
    """numpy's bool scalar (no numpy import needed: it names itself numpy.bool / numpy.bool_)."""
    kind = type(value)
    return kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")


def seed_tensor(value: torch.Tensor, name: str) -> torch.Tensor:
    """A seed given as a tensor: one integer element with a value (not bool, not meta)."""
    if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool \
            or value.is_meta:
        raise TypeError(f"{name}: expected an int or a 1-element integer tensor, got {_shown(value)}"
                        + (f" of shape {tuple(value.shape)}" if value.numel() != 1 else ""))
    return value
