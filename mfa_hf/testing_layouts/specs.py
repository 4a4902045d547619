"""Specs: frozen dataclasses describing one API call (shapes, flags, each tensor argument's layout and
dtype). Their repr is Python that rebuilds them, so each failure prints a one-line reproduction
(`repro_command`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from .layouts import CONTIGUOUS, Layout


@dataclass(frozen=True)
class MaskSpec:
    """attn_mask: bool (True = attend) or additive (a float dtype).

    dims: the passed tensor's dims, aligned to the end of (B, H, Lq, Lk): each is that dim's name or
    "1" (broadcast). layout.expand lists positions (in dims) of "1" dims stored once and expanded to
    the full size (stride 0). fill: an additive mask's value at masked entries: "-inf", "finfo.min"
    (of the mask's dtype, as transformers writes it) or "finfo32.min" (float32's, cast).
    empty_rows: one row (per broadcast position) fully masked.
    """

    dtype: str = "bool"
    dims: tuple = ("B", "H", "Lq", "Lk")
    layout: Layout = CONTIGUOUS
    fill: str = "-inf"
    empty_rows: bool = True
    requires_grad: bool = True

    @property
    def additive(self) -> bool:
        return self.dtype != "bool"

    @property
    def name(self) -> str:
        parts = ["(" + ",".join(self.dims) + ")", self.layout.name, self.dtype]
        if self.additive:
            parts.append(self.fill)
        return "-".join(parts)


FULL_DIMS = ("B", "H", "Lq", "Lk")


@dataclass(frozen=True)
class VectorSpec:
    """A float helper tensor: alibi slopes ((Hq,) or (B, Hq): dims) or sinks ((Hq,))."""

    dtype: str = "float32"
    layout: Layout = CONTIGUOUS
    dims: tuple = ("H",)
    requires_grad: bool = True  # sinks only

    @property
    def name(self) -> str:
        return f"({','.join(self.dims)})-{self.layout.name}-{self.dtype}"


@dataclass(frozen=True)
class IndexSpec:
    """An integer tensor argument (cu_seqlens, cache_seqlens, cache_batch_idx)."""

    dtype: str = "int32"
    layout: Layout = CONTIGUOUS

    @property
    def name(self) -> str:
        return f"{self.layout.name}-{self.dtype}"


@dataclass(frozen=True)
class DenseSpec:
    """One flash_attn_func call (forward, and backward through out and optionally the LSE)."""

    dtype: str = "float32"
    batch: int = 2
    lq: int = 17
    lk: int = 19
    heads_q: int = 4
    heads_kv: int = 2
    dim: int = 16
    dim_v: int = 12
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    q: Layout = CONTIGUOUS
    k: Layout = CONTIGUOUS
    v: Layout = CONTIGUOUS
    mask: Optional[MaskSpec] = None
    alibi: Optional[VectorSpec] = None
    sinks: Optional[VectorSpec] = None
    backward: bool = True
    grad_out: Layout = CONTIGUOUS
    grad_lse: Optional[Layout] = None  # None: the loss does not use the LSE
    nan_q: bool = False  # one NaN in q (forward only)
    seed: int = 0


@dataclass(frozen=True)
class VarlenSpec:
    """One flash_attn_varlen_func call over packed sequences (empty ones allowed)."""

    dtype: str = "float32"
    lengths_q: tuple = (5, 0, 9, 3)
    lengths_k: tuple = (7, 4, 0, 6)
    heads_q: int = 4
    heads_kv: int = 2
    dim: int = 16
    dim_v: int = 12
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    extra_max: int = 0  # max_seqlen_q/k passed larger than the longest sequence by this much
    q: Layout = CONTIGUOUS
    k: Layout = CONTIGUOUS
    v: Layout = CONTIGUOUS
    cu_q: IndexSpec = IndexSpec()
    cu_k: IndexSpec = IndexSpec()
    alibi: Optional[VectorSpec] = None
    sinks: Optional[VectorSpec] = None
    backward: bool = True
    grad_out: Layout = CONTIGUOUS
    grad_lse: Optional[Layout] = None
    seed: int = 0


@dataclass(frozen=True)
class KVCacheSpec:
    """One flash_attn_with_kvcache call over a plain cache (forward; appends `new` tokens first).

    seqlens: "tensor" (cache_seqlens per IndexSpec seqlens_index), "int" (every row lengths[0]) or
    "none" (every row sees the whole cache; no append). batch_idx: the cache row of each batch row.
    """

    dtype: str = "float32"
    lq: int = 1
    new: int = 1
    heads_q: int = 4
    heads_kv: int = 2
    dim: int = 16
    dim_v: int = 16
    capacity: int = 24
    lengths: tuple = (0, 9, 20)
    cache_rows: int = 3
    causal: bool = True
    window: tuple = (-1, -1)
    softcap: float = 0.0
    num_splits: int = 0
    q: Layout = CONTIGUOUS
    k_cache: Layout = CONTIGUOUS
    v_cache: Layout = CONTIGUOUS
    k_new: Layout = CONTIGUOUS
    v_new: Layout = CONTIGUOUS
    seqlens: str = "tensor"
    seqlens_index: IndexSpec = IndexSpec()
    batch_idx: Optional[tuple] = None
    batch_idx_index: IndexSpec = IndexSpec()
    alibi: Optional[VectorSpec] = None
    sinks: Optional[VectorSpec] = None
    nan_q: bool = False
    seed: int = 0

    @property
    def batch(self) -> int:
        return len(self.lengths)


def describe(spec) -> str:
    """The fields that differ from the defaults, for messages."""
    default = type(spec)()
    changed = [f"{f.name}={getattr(spec, f.name)!r}" for f in fields(spec)
               if getattr(spec, f.name) != getattr(default, f.name)]
    return f"{type(spec).__name__}({', '.join(changed)})"


def repro_command(spec, backend: str) -> str:
    env = {"torch": "MFA_BACKEND=torch", "metal": "MFA_BACKEND=metal MFA_METAL_EMULATOR=1",
           "triton": "MFA_BACKEND=triton TRITON_INTERPRET=1"}[backend]
    code = f"from mfa_hf.testing_layouts import *; print(run_spec({describe(spec)}) or 'pass')"
    return f"{env} python -c \"{code}\""
