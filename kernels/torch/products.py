"""How the torch backend's backward multiplies: in its accumulation dtype, or with bfloat16 operands
(bf16_backward=True) and the products summed in float32.

With bf16_backward the operands of every backward matmul (Q, K, V, dO, P, dS) are rounded to bfloat16
and each product is accumulated in float32, as a bf16 tensor-core MMA does. Two ways, the same numbers
up to summation order:
- native: bfloat16 tensors multiplied into a float32 result (torch.bmm(..., out_dtype=torch.float32));
  where the device has it (CUDA), this is where bf16_backward is faster;
- emulated: elsewhere (CPU, MPS), bfloat16 values held in float32 and multiplied in float32. A product
  of two bfloat16 numbers is exact in float32, so the rounding is the same, without a speed-up: a
  bfloat16-output matmul would round every product once more, and is slower than float32 on CPUs
  without bfloat16 units.
"""

from __future__ import annotations

import functools

import torch


class FullPrecision:
    """The default backward: operands as they are (already in the accumulation dtype)."""

    native = False

    @staticmethod
    def operand(x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b

    @staticmethod
    def scores(q3: torch.Tensor, k3: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.baddbmm(q3.new_empty(()), q3, k3, beta=0.0, alpha=scale)


class Bfloat16Operands:
    """bf16_backward: operands rounded to bfloat16, float32 results (see the module docstring)."""

    def __init__(self, native: bool):
        self.native = native

    def operand(self, x: torch.Tensor) -> torch.Tensor:
        rounded = x.to(torch.bfloat16)
        return rounded if self.native else rounded.to(torch.float32)

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.native:
            return a @ b
        batch = a.shape[:-2]
        product = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
        return product.reshape(*batch, a.shape[-2], b.shape[-1])

    def scores(self, q3: torch.Tensor, k3: torch.Tensor, scale: float) -> torch.Tensor:
        if not self.native:
            return FullPrecision.scores(q3, k3, scale)
        return torch.bmm(q3, k3, out_dtype=torch.float32).mul_(scale)


def products_for(bf16_backward: bool, device: torch.device):
    """The backward's way of multiplying on `device`."""
    if not bf16_backward:
        return FullPrecision
    return Bfloat16Operands(native_bf16_products(device.type))


@functools.lru_cache(maxsize=None)
def native_bf16_products(device_type: str) -> bool:
    """Whether `device_type` multiplies bfloat16 tensors into a float32 result (probed once per type)."""
    if device_type == "cpu":
        return False  # no out_dtype kernel, and bfloat16 matmuls are slower than float32 on most CPUs
    try:
        a = torch.ones((1, 2, 2), dtype=torch.bfloat16, device=device_type)
        return bool(torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
