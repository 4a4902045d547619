"""The input values of a spec, seeded per (seed, argument name) so that a repro rebuilds them exactly."""

from __future__ import annotations

import math
import zlib

import torch

from .layouts import compact_shape, dtype_of
from .specs import FULL_DIMS, MaskSpec, VectorSpec


def seeded_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def seeded_randn(shape, dtype: torch.dtype, seed: int, name: str) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=seeded_generator(seed, name)).to(dtype)


def mask_values(spec: MaskSpec, full: dict, seed: int) -> tuple[torch.Tensor, tuple]:
    """(compact values, passed shape) of an attn_mask."""
    compact = tuple(1 if d == "1" else full[d] for d in spec.dims)
    passed = tuple(full[FULL_DIMS[4 - len(spec.dims) + j]] if (d != "1" or j in spec.layout.expand) else 1
                   for j, d in enumerate(spec.dims))
    g = seeded_generator(seed, "mask")
    keep4 = torch.rand((1,) * (4 - len(compact)) + compact, generator=g) > 0.3
    if spec.empty_rows and keep4.numel():
        index = tuple(int(torch.randint(n, (1,), generator=g)) for n in keep4.shape[:3])
        keep4[index] = False
    keep = keep4.reshape(compact)
    if not spec.additive:
        return keep, passed
    dtype = dtype_of(spec.dtype)
    fill = {"-inf": -math.inf, "finfo.min": torch.finfo(dtype).min,
            "finfo32.min": torch.finfo(torch.float32).min}[spec.fill]
    bias = torch.randn(compact, generator=g).to(torch.float64)
    return bias.masked_fill(~keep, fill).to(dtype), passed


def vector_values(spec: VectorSpec, full: dict, seed: int, name: str, positive: bool) -> tuple[torch.Tensor, tuple]:
    shape = tuple(full[d] for d in spec.dims)
    compact = compact_shape(shape, spec.layout)
    g = seeded_generator(seed, name)
    values = torch.rand(compact, generator=g) * 0.5 if positive else torch.randn(compact, generator=g)
    return values.to(dtype_of(spec.dtype)), shape

