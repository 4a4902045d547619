"""Layouts: where an argument's elements live inside a garbage-filled buffer, and placing values there.

A `Layout` places an argument's values inside a bigger 1-D buffer: transposed (another memory order),
sliced (every step-th element of a bigger dimension), offset (storage offset > 0) and expanded (stride
0 over a dimension whose values repeat). The gaps and both ends of the buffer hold garbage (NaN, large
integers, random bools), so a kernel that reads the wrong element is caught, and the buffer must be
bitwise unchanged after the call (`unchanged`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
KERNEL_DTYPES = ("float16", "bfloat16", "float32")  # q/k/v dtypes every backend serves (torch adds float64)
INT_NAMES = ("int32", "int64")
TAIL = 3  # garbage elements after an argument's last element
GARBAGE_INT = 2**30 + 7  # what an index tensor's gaps hold: far out of range


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


@dataclass(frozen=True)
class Layout:
    """Where an argument's elements live in its buffer.

    order: the memory order of the logical dims, outermost first (() = logical order).
    steps: per logical dim, the argument takes every step-th element of a dim step times bigger.
    offset: elements of garbage before the first element (the view's storage offset).
    expand: logical dims stored once and expanded (stride 0); their values repeat.
    """

    order: tuple = ()
    steps: tuple = ()
    offset: int = 0
    expand: tuple = ()

    @property
    def name(self) -> str:
        parts = []
        if self.order and list(self.order) != sorted(self.order):
            parts.append("transposed" + "".join(map(str, self.order)))
        if any(s > 1 for s in self.steps):
            parts.append("sliced" + "".join(map(str, self.steps)))
        if self.offset:
            parts.append(f"offset{self.offset}")
        if self.expand:
            parts.append("expanded" + "".join(map(str, self.expand)))
        return "+".join(parts) or "contiguous"

    def without_expand(self) -> "Layout":
        return replace(self, expand=())


CONTIGUOUS = Layout()


def named_layout(kind: str, rank: int, expand: tuple = (), order: tuple | None = None) -> Layout:
    """The catalog of the targeted cases: contiguous, transposed (a realistic other order, e.g.
    (B, H, S, D) memory for a (B, S, H, D) view), permuted (innermost dim not last), sliced, offset,
    expanded (the given dims), mixed (transposed + sliced + offset, expanded where allowed)."""
    identity = tuple(range(rank))
    transposed = order or (identity[::-1] if rank <= 2 else (0, 2, 1, 3) if rank == 4 else (1, 0, 2))
    if kind == "contiguous":
        return CONTIGUOUS
    if kind == "transposed":
        return Layout(order=transposed if rank > 1 else ())
    if kind == "permuted":
        return Layout(order=identity[::-1])
    if kind == "sliced":
        return Layout(steps=tuple(2 if d == rank - 1 else 3 if d == 0 and rank > 1 else 1 for d in identity))
    if kind == "offset":
        return Layout(offset=3)
    if kind == "expanded":
        return Layout(expand=tuple(expand))
    if kind == "mixed":
        return Layout(order=transposed if rank > 1 else (), steps=tuple(2 if d == 0 else 1 for d in identity),
                      offset=5, expand=tuple(expand))
    raise ValueError(f"layout kind: expected one of contiguous, transposed, permuted, sliced, offset, expanded, "
                     f"mixed, got {kind!r}")


def compact_shape(shape: tuple, layout: Layout) -> tuple:
    """The shape of the values an argument of `shape` stores (1 along expanded dims)."""
    return tuple(1 if d in layout.expand else n for d, n in enumerate(shape))


def chain(flat: torch.Tensor, compact: tuple, layout: Layout) -> torch.Tensor:
    """The view of `flat` that holds the compact values (the layout without its expand)."""
    rank = len(compact)
    order = tuple(layout.order) or tuple(range(rank))
    steps = tuple(layout.steps) or (1,) * rank
    padded = [compact[d] * steps[d] for d in order]
    count = math.prod(padded)
    region = flat[layout.offset: layout.offset + count].view(padded)
    region = region[tuple(slice(None, None, steps[d]) for d in order)]
    inverse = [order.index(d) for d in range(rank)]
    return region.permute(inverse)


class SpecNotApplicable(Exception):
    """The spec cannot be built on this device (float64 tensors on mps): the case is skipped."""


def garbage(dtype: torch.dtype, count: int, generator: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(count, generator=generator) > 0.5
    if dtype.is_floating_point:
        return torch.full((count,), float("nan"), dtype=dtype)
    return torch.full((count,), GARBAGE_INT, dtype=dtype)


@dataclass
class Placed:
    """An argument in its layout. arg: what the API receives; flat: the whole buffer (the autograd
    leaf when differentiable); value: the compact values on the CPU; shape: arg's shape."""

    arg: torch.Tensor
    flat: torch.Tensor
    value: torch.Tensor
    layout: Layout
    shape: tuple
    snapshot: Optional[torch.Tensor] = None

    def region(self, flat: torch.Tensor) -> torch.Tensor:
        return chain(flat, tuple(self.value.shape), self.layout)

    def grad(self) -> Optional[torch.Tensor]:
        """The gradient of the compact values (summed over expanded dims by autograd)."""
        if self.flat.grad is None:
            return None
        return self.region(self.flat.grad).detach().cpu()


def place(value: torch.Tensor, shape: tuple, layout: Layout, device, requires_grad: bool = False,
          seed: int = 0) -> Placed:
    """`value` (the compact values, CPU) laid out per `layout` in a garbage-filled buffer on `device`."""
    shape = tuple(shape)
    compact = compact_shape(shape, layout)
    if tuple(value.shape) != compact:
        raise ValueError(f"place: expected values of shape {compact} for {shape} with {layout.name}, "
                         f"got {tuple(value.shape)}")
    rank = len(shape)
    steps = tuple(layout.steps) or (1,) * rank
    if len(steps) != rank or (layout.order and sorted(layout.order) != list(range(rank))):
        raise ValueError(f"place: layout {layout} does not fit rank {rank}")
    count = math.prod(compact[d] * steps[d] for d in range(rank))
    if torch.device(device).type == "mps" and value.dtype == torch.float64:
        raise SpecNotApplicable("mps has no float64 tensors")
    flat = garbage(value.dtype, layout.offset + count + TAIL, torch.Generator().manual_seed(seed))
    chain(flat, compact, layout).copy_(value)
    flat = flat.to(device)
    if requires_grad:
        flat.requires_grad_(True)
    arg = chain(flat, compact, layout).expand(shape)
    placed = Placed(arg, flat, value, layout, shape)
    placed.snapshot = flat.detach().clone()
    if not torch.equal(bits(arg.detach().cpu()), bits(value.expand(shape))):
        raise AssertionError(f"place: the {layout.name} view does not hold its values (harness bug)")
    return placed


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits (NaN == NaN, -0 != 0) of a tensor, contiguous."""
    t = t.contiguous()
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def unchanged(placed: Placed) -> bool:
    return torch.equal(bits(placed.flat.detach().cpu()), bits(placed.snapshot.cpu()))
