"""The handle MFAQuantizedCache.update() returns instead of K/V tensors (no transformers import here:
the attention functions test for it on every call, and `import mfa_hf` must stay light)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...quant import QuantizedKV
from .step import StepPlans


class QuantizedCacheError(TypeError):
    """A quantized cache handle reached code that wanted a plain tensor."""


@dataclass(frozen=True)
class QuantizedCacheView:
    """What `update()` returns for one side (K or V): keys [0, L) of the layer as the kernel reads them.

    quantized: QuantizedKV (B, capacity, Hkv, D) store, of which the first `length` tokens are valid
    (they come first in time); residual: (B, Hkv, r, D) full-precision newest tokens, or None.
    `shape` is the (B, Hkv, L, D) a DynamicLayer would have returned, L = length + r.
    """

    quantized: QuantizedKV | None  # None until the first tokens leave the residual
    length: int
    residual: torch.Tensor | None = None
    # The cache's holder of the current step's decode plan (shared by its layers), and the step: every
    # layer of one step has seen the same number of tokens.
    step_plans: StepPlans | None = None
    step: int = 0
    # The layer's own sliding window (transformers' count: the current token included), None for a full layer:
    # the window a DynamicCache applies by trimming, which some models (Moshi) pass to attention no other way.
    window: int | None = None

    @property
    def residual_length(self) -> int:
        return 0 if self.residual is None else self.residual.shape[2]

    @property
    def shape(self) -> torch.Size:
        if self.quantized is None:
            return self.residual.shape
        b, _, h, d = self.quantized.shape
        return torch.Size((b, h, self.length + self.residual_length, d))

    @property
    def dtype(self) -> torch.dtype:
        return self.residual.dtype if self.quantized is None else self.quantized.dtype

    @property
    def device(self) -> torch.device:
        return self.residual.device if self.quantized is None else self.quantized.device

    def dim(self) -> int:
        return 4

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dequantize(self) -> torch.Tensor:
        """(B, Hkv, L, D) values the kernel attends over (tests and references only)."""
        q = self.quantized
        if q is None:
            return self.residual
        prefix = QuantizedKV(q.codes[:, : self.length], q.scales[:, : self.length], q.format, q.group_size,
                             q.dtype).dequantize().transpose(1, 2)
        return prefix if self.residual is None else torch.cat([prefix, self.residual.to(prefix.dtype)], dim=2)

    # Reached when a model computes on the cached states itself (DeepSeek-V3's latent) or the
    # attention implementation is not an mfa-hf one: say so instead of a cryptic TypeError.
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise QuantizedCacheError(_misuse(getattr(func, "__name__", str(func)) + "()"))

    def __getitem__(self, index):
        raise QuantizedCacheError(_misuse("indexing"))

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise QuantizedCacheError(_misuse(f".{name}"))


def _misuse(what: str) -> str:
    return (f"MFAQuantizedCache: {what} on a quantized cache handle, which is not a tensor. The cache serves "
            'only attn_implementation="mps_flash" or "mfa" on models that pass the cached K/V straight to '
            "attention (not DeepSeek-V3's latent cache, not eager/sdpa).")
