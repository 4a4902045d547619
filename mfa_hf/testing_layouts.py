"""Every tensor argument in unusual layouts and dtypes, against the float64 reference (issue 16).

DESIGN.md's kernel-boundary rule: the tensor bound to a kernel is the tensor whose strides are passed,
and tests give *every* tensor argument unusual layouts, not only q/k/v. This module builds such
arguments and checks one call of the public API (`flash_attn_func`, `flash_attn_varlen_func`,
`flash_attn_with_kvcache`) against kernels/reference.py with the tolerance rule of mfa_hf/testing.py.

- A `Layout` places an argument's values inside a bigger 1-D buffer: transposed (another memory
  order), sliced (every step-th element of a bigger dimension), offset (storage offset > 0) and
  expanded (stride 0 over a dimension whose values repeat). The gaps and both ends of the buffer hold
  garbage (NaN, large integers, random bools), so a kernel that reads the wrong element is caught,
  and the buffer must be bitwise unchanged after the call (only a KV cache's appended rows change).
- `DenseSpec`, `VarlenSpec` and `KVCacheSpec` describe one call: shapes, flags, and each tensor
  argument's layout and dtype. They are frozen dataclasses whose repr is Python that rebuilds them,
  so each failure prints a one-line reproduction (`repro_command`).
- `run_spec(spec)` makes the inputs (seeded), calls the API with the backend MFA_BACKEND forces,
  and returns a list of failures (empty: every output, LSE, gradient and side effect matched).
- `IsolatedRunner` runs specs in a worker process per backend, with TRITON_INTERPRET /
  MFA_METAL_EMULATOR set before mfa_hf is imported; a kernel that aborts the process fails one case
  (the worker restarts) instead of killing pytest.
- `targeted_cases()` lists one case per (argument, layout, dtype) and the semantic cases; hypothesis
  strategies (`dense_specs`, `varlen_specs`, `kvcache_specs`) draw everything at once.

Semantics checked through the reference (kernels/reference.py): a NaN in q reaches its output row (as
NaN) unless the row sees no key; an additive mask is added exactly (a row masked by finfo.min
everywhere averages V: the scores vanish next to the mask value); a row with no visible key (bool
mask, -inf, causal) gives 0 and LSE -inf; with Lk = 0 the LSE is the sink, so dsinks = sum of dLSE.

Gradients of rows that an additive finfo(float32).min mask covers entirely get a zero upstream
gradient here: FlashAttention's backward recomputes P = exp(s - LSE) from the float32 LSE, which has
absorbed the scores (s - LSE = 0, P = 1 instead of 1/n), an error testing._noise_bounds allows by
design; leaving those rows in would make every other gradient's allowance vacuous.
"""

from __future__ import annotations

import math
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import traceback
import zlib
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from .testing import FORWARD_FACTOR, GRADIENT_FACTOR, assert_close_to_reference, delta_rounding_effect

FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
KERNEL_DTYPES = ("float16", "bfloat16", "float32")  # q/k/v dtypes every backend serves (torch adds float64)
INT_NAMES = ("int32", "int64")
TAIL = 3  # garbage elements after an argument's last element
GARBAGE_INT = 2**30 + 7  # what an index tensor's gaps hold: far out of range
ABSORBING = 1e30  # an additive mask value this negative swallows any score in float32


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


# ----------------------------------------------------------------------------------------------
# Layouts


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


def _chain(flat: torch.Tensor, compact: tuple, layout: Layout) -> torch.Tensor:
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


def _garbage(dtype: torch.dtype, count: int, generator: torch.Generator) -> torch.Tensor:
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
        return _chain(flat, tuple(self.value.shape), self.layout)

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
    flat = _garbage(value.dtype, layout.offset + count + TAIL, torch.Generator().manual_seed(seed))
    _chain(flat, compact, layout).copy_(value)
    flat = flat.to(device)
    if requires_grad:
        flat.requires_grad_(True)
    arg = _chain(flat, compact, layout).expand(shape)
    placed = Placed(arg, flat, value, layout, shape)
    placed.snapshot = flat.detach().clone()
    if not torch.equal(_bits(arg.detach().cpu()), _bits(value.expand(shape))):
        raise AssertionError(f"place: the {layout.name} view does not hold its values (harness bug)")
    return placed


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits (NaN == NaN, -0 != 0) of a tensor, contiguous."""
    t = t.contiguous()
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _unchanged(placed: Placed) -> bool:
    return torch.equal(_bits(placed.flat.detach().cpu()), _bits(placed.snapshot.cpu()))


# ----------------------------------------------------------------------------------------------
# Argument specs


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


# ----------------------------------------------------------------------------------------------
# Values


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _randn(shape, dtype: torch.dtype, seed: int, name: str) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=_generator(seed, name)).to(dtype)


def _mask_values(spec: MaskSpec, full: dict, seed: int) -> tuple[torch.Tensor, tuple]:
    """(compact values, passed shape) of an attn_mask."""
    compact = tuple(1 if d == "1" else full[d] for d in spec.dims)
    passed = tuple(full[FULL_DIMS[4 - len(spec.dims) + j]] if (d != "1" or j in spec.layout.expand) else 1
                   for j, d in enumerate(spec.dims))
    g = _generator(seed, "mask")
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


def _vector_values(spec: VectorSpec, full: dict, seed: int, name: str, positive: bool) -> tuple[torch.Tensor, tuple]:
    shape = tuple(full[d] for d in spec.dims)
    compact = compact_shape(shape, spec.layout)
    g = _generator(seed, name)
    values = torch.rand(compact, generator=g) * 0.5 if positive else torch.randn(compact, generator=g)
    return values.to(dtype_of(spec.dtype)), shape


# ----------------------------------------------------------------------------------------------
# Comparison


def _coarser(*dtypes: torch.dtype) -> torch.dtype:
    floats = [d for d in dtypes if d.is_floating_point]
    return max(floats, key=lambda d: torch.finfo(d).eps)


def _locate(actual: torch.Tensor, reference: torch.Tensor) -> str:
    """Where and how actual differs most from reference (for the failure message)."""
    a = actual.detach().cpu().to(torch.float64)
    r = reference.detach().to(torch.float64)
    if a.shape != r.shape or a.numel() == 0:
        return ""
    nan_diff = torch.isnan(a) != torch.isnan(r)
    if bool(nan_diff.any()):
        index = tuple(int(i) for i in nan_diff.nonzero()[0])
        return f"; first NaN mismatch at {index}: got {float(a[index]):.6g}, want {float(r[index]):.6g}"
    finite = torch.isfinite(r)
    inf_diff = ~finite & ~torch.isnan(r) & (a != r)
    if bool(inf_diff.any()):
        index = tuple(int(i) for i in inf_diff.nonzero()[0])
        return f"; first infinity mismatch at {index}: got {float(a[index]):.6g}, want {float(r[index]):.6g}"
    error = torch.where(finite, (a - r).abs(), 0.0)
    error = torch.nan_to_num(error, nan=math.inf)
    flat_index = int(error.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), a.shape))
    zero_rows = ""
    if a.dim() >= 2:
        rows_zero = (a == 0).all(-1) & (r != 0).any(-1)
        if bool(rows_zero.any()):
            zero_rows = f"; {int(rows_zero.sum())} rows are 0 where the reference's are not"
    return f"; worst at {index}: got {float(a[index]):.6g}, want {float(r[index]):.6g}{zero_rows}"


def compare(name: str, actual, reference: torch.Tensor, baseline: torch.Tensor, factor: float,
            dtype: torch.dtype | None = None, algorithmic: float = 0.0) -> list[str]:
    """testing.assert_close_to_reference as a list of failures (with where the worst error is)."""
    if actual is None:
        return [f"{name}: missing (None) where the reference has a {tuple(reference.shape)} tensor"]
    actual = actual.detach().cpu()
    try:
        assert_close_to_reference(actual, reference, baseline, factor, name, dtype, algorithmic)
    except AssertionError as error:
        return [f"{error}{_locate(actual, reference)}"]
    return []


def compare_lse(lse, ref_lse, base_lse, factor: float) -> list[str]:
    """The LSE as a whole, then (when some rows' LSE is huge: finfo.min masks) the ordinary rows on
    their own, so that one huge row's ulp does not become everyone's tolerance."""
    failures = compare("lse", lse, ref_lse, base_lse, factor)
    huge = torch.isfinite(ref_lse) & (ref_lse.abs() > 1e20)
    if failures or not bool(huge.any()) or lse is None:
        return failures
    ordinary = ~huge
    return compare("lse (rows without a finfo.min mask)", lse.detach().cpu()[ordinary], ref_lse[ordinary],
                   base_lse.detach()[ordinary], factor)


def noise_bounds(q, k, v, out, grad_out, grad_lse, mask, slopes, sinks, causal, window, softcap,
                 scale: float | None = None) -> dict:
    """testing._noise_bounds per element (dense (B, S, H, D) tensors, float64 on the CPU).

    Generalized for this module: the LSE's gradient (the backward's delta becomes rowsum(dO O) -
    dLSE), masks of any broadcast shape, and per-element bounds that the caller sums over expanded
    dims. Returns bounds shaped like q, k, v (B, S, H, D), the mask (B, Hq, Lq, Lk) and sinks (Hq,).
    """
    from .kernels.reference import attention_reference

    eps = torch.finfo(torch.float32).eps
    batch, lq, heads_q, dim = q.shape
    heads_kv = k.shape[2]
    group = heads_q // heads_kv
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    with torch.no_grad():
        _, lse, probs = attention_reference(q, k, v, attn_mask=mask, alibi_slopes=slopes, sinks=sinks, causal=causal,
                                            window_size=window, softcap=softcap, return_probs=True)

        def heads_first(t, repeat=1):
            return t.abs().transpose(1, 2).repeat_interleave(repeat, dim=1)

        do_abs = heads_first(grad_out)
        delta_abs = torch.nan_to_num((grad_out * out).abs().sum(-1), nan=0.0).transpose(1, 2)  # (B, Hq, Lq)
        if grad_lse is not None:
            delta_abs = delta_abs + torch.nan_to_num(grad_lse.abs(), nan=0.0)
        lse_abs = torch.nan_to_num(lse.abs(), nan=0.0, posinf=0.0)[..., None]
        p_err = 2 * eps * (probs * (lse_abs + 1) + (-torch.special.xlogy(probs, probs)).abs())
        dp_abs = do_abs @ heads_first(v, group).transpose(-1, -2)
        ds_err = p_err * (dp_abs + delta_abs[..., None]) + probs * (2 * eps * delta_abs)[..., None]

        def per_kv_head(t):
            return t.reshape(batch, heads_kv, group, t.shape[-2], t.shape[-1]).sum(2)

        bounds = {
            "q": (ds_err @ heads_first(k, group)).transpose(1, 2) * scale,
            "k": per_kv_head(ds_err.transpose(-1, -2) @ heads_first(q)).transpose(1, 2) * scale,
            "v": per_kv_head(p_err.transpose(-1, -2) @ do_abs).transpose(1, 2),
            "attn_mask": ds_err,
        }
        if sinks is not None:
            sink_probs = torch.exp(sinks[None, :, None] - lse)
            sink_probs = torch.nan_to_num(sink_probs, nan=0.0)
            sink_err = sink_probs * (2 * eps * (lse_abs[..., 0] + 1)) * delta_abs + sink_probs * 2 * eps * delta_abs
            bounds["sinks"] = sink_err.sum(dim=(0, 2))
    return bounds


def _rounding_effects(out, ref, ref_lse, leaves, grad_out) -> list[float]:
    """testing.delta_rounding_effect per leaf (0 for empty leaves and empty outputs)."""
    effects = [0.0] * len(leaves)
    nonempty = [n for n, leaf in enumerate(leaves) if leaf.numel()]
    if not nonempty or out.numel() == 0 or not ref_lse.requires_grad:
        return effects
    found = delta_rounding_effect(out.detach().cpu(), ref, ref_lse, [leaves[n] for n in nonempty], grad_out)
    for n, effect in zip(nonempty, found):
        effects[n] = effect
    return effects


def _reduce_bound(bound: torch.Tensor | None, compact: tuple) -> float:
    """A per-element bound summed over the dims an argument's values were expanded or broadcast along."""
    if bound is None or bound.numel() == 0:
        return 0.0
    rank = len(compact)
    if bound.dim() > rank:  # a mask passed with fewer dims: the leading dims broadcast
        bound = bound.sum(dim=tuple(range(bound.dim() - rank)))
    return float(bound.sum_to_size(compact).max()) if math.prod(compact) else 0.0


# ----------------------------------------------------------------------------------------------
# Running one spec (in whatever process has the backend's environment)


def current_backend() -> str:
    return os.environ.get("MFA_BACKEND", "auto").strip().lower()


def default_device(backend: str | None = None) -> str:
    backend = backend or current_backend()
    if backend == "metal":
        from .kernels.metal.emulator.runtime_select import metal_runtime

        return metal_runtime().device
    if backend == "triton" and os.environ.get("MFA_TRITON_FULL") == "1":
        return "cuda"
    return "cpu"


def run_spec(spec, device: str | None = None) -> list[str]:
    """Run one spec with the backend MFA_BACKEND forces; returns the failures (empty = pass)."""
    device = device or default_device()
    runner = {DenseSpec: _run_dense, VarlenSpec: _run_varlen, KVCacheSpec: _run_kvcache}[type(spec)]
    return runner(spec, device)


def _served(calls, op: str) -> list[str]:
    from . import trace

    backend = current_backend()
    served = trace.served_by(calls)
    if backend == "auto" or served[(backend, op)] == 1:
        return []
    return [f"{op}: expected one call of the {backend} backend's {op} op, got {dict(served)}"]


def _inputs_unchanged(placed: dict, when: str) -> list[str]:
    return [f"{name}: its buffer ({p.layout.name}) changed during the {when} (a kernel wrote into an input or its "
            f"gaps)" for name, p in placed.items() if p is not None and not _unchanged(p)]


def _leaf_copies(values: dict, upcast: bool, grads: tuple, shapes: dict) -> tuple[dict, dict]:
    """(arguments, leaves) for the reference: float64 copies (upcast) or copies in their own dtype."""
    args, leaves = {}, {}
    for name, value in values.items():
        if value is None:
            args[name] = None
            continue
        t = value.detach().to(torch.float64) if upcast and value.is_floating_point() else value.detach().clone()
        if name in grads:
            t.requires_grad_(True)
            leaves[name] = t
        args[name] = t.expand(shapes[name])
    return args, leaves


def _absorbing_rows(mask64: torch.Tensor | None, full_shape: tuple, causal: bool, window: tuple) -> torch.Tensor:
    """(B, Hq, Lq) True where an additive mask swallows every visible key's score (finfo.min)."""
    from .kernels.reference import visible_keys

    batch, heads, lq, lk = full_shape
    if mask64 is None or mask64.dtype == torch.bool:
        return torch.zeros(batch, heads, lq, dtype=torch.bool)
    mask = mask64.to(torch.float64).expand(full_shape)
    visible = visible_keys(lq, lk, causal, window)
    swallowed = (mask < -ABSORBING) & torch.isfinite(mask)
    return (swallowed | ~visible).all(-1) & (swallowed & visible).any(-1)


def _run_dense(spec: DenseSpec, device) -> list[str]:
    import mfa_hf
    from . import trace
    from .kernels.reference import attention_reference

    dtype = dtype_of(spec.dtype)
    b, lq, lk, hq, hkv = spec.batch, spec.lq, spec.lk, spec.heads_q, spec.heads_kv
    full = {"B": b, "H": hq, "Lq": lq, "Lk": lk}
    grads = spec.backward and not spec.nan_q
    shapes = {"q": (b, lq, hq, spec.dim), "k": (b, lk, hkv, spec.dim), "v": (b, lk, hkv, spec.dim_v)}
    layouts = {"q": spec.q, "k": spec.k, "v": spec.v}
    values = {name: _randn(compact_shape(shapes[name], layouts[name]), dtype, spec.seed, name) for name in shapes}
    if spec.nan_q and values["q"].numel():
        g = _generator(spec.seed, "nan")
        index = tuple(int(torch.randint(n, (1,), generator=g)) for n in values["q"].shape)
        values["q"][index] = float("nan")
    differentiable = {"q", "k", "v"} if grads else set()
    values["attn_mask"] = values["alibi_slopes"] = values["sinks"] = None
    if spec.mask is not None:
        values["attn_mask"], shapes["attn_mask"] = _mask_values(spec.mask, full, spec.seed)
        layouts["attn_mask"] = spec.mask.layout
        if grads and spec.mask.additive and spec.mask.requires_grad:
            differentiable.add("attn_mask")
    if spec.alibi is not None:
        values["alibi_slopes"], shapes["alibi_slopes"] = _vector_values(spec.alibi, full, spec.seed, "alibi", True)
        layouts["alibi_slopes"] = spec.alibi.layout
    if spec.sinks is not None:
        values["sinks"], shapes["sinks"] = _vector_values(spec.sinks, full, spec.seed, "sinks", False)
        layouts["sinks"] = spec.sinks.layout
        if grads and spec.sinks.requires_grad:
            differentiable.add("sinks")
    placed = {name: None if value is None else place(value, shapes[name], layouts[name], device,
                                                     name in differentiable, spec.seed)
              for name, value in values.items()}
    arg = {name: None if p is None else p.arg for name, p in placed.items()}
    options = dict(causal=spec.causal, window_size=tuple(spec.window), softcap=spec.softcap)
    with trace.capture() as calls:
        try:
            out, lse = mfa_hf.flash_attn_func(arg["q"], arg["k"], arg["v"], attn_mask=arg["attn_mask"],
                                               alibi_slopes=arg["alibi_slopes"], sinks=arg["sinks"],
                                               return_lse=True, **options)
        except Exception as error:  # noqa: BLE001 - a failure to report, not to hide
            return [f"forward raised {type(error).__name__}: {error}"]
    failures = _served(calls, "fwd")

    def reference(upcast: bool):
        args, leaves = _leaf_copies(values, upcast, tuple(differentiable), shapes)
        ref_out, ref_lse = attention_reference(args["q"], args["k"], args["v"], attn_mask=args["attn_mask"],
                                               alibi_slopes=args["alibi_slopes"], sinks=args["sinks"],
                                               upcast=upcast, **options)
        return ref_out, ref_lse, leaves

    ref, ref_lse, ref_leaves = reference(True)
    base, base_lse, base_leaves = reference(False)
    factor = GRADIENT_FACTOR if spec.softcap > 0 else FORWARD_FACTOR
    failures += compare("out", out, ref.detach(), base.detach(), factor)
    failures += compare_lse(lse, ref_lse.detach(), base_lse.detach(), factor)
    failures += _inputs_unchanged(placed, "forward")
    if not grads:
        return failures

    mask64 = None if values["attn_mask"] is None else values["attn_mask"].to(torch.float64)
    if mask64 is not None and values["attn_mask"].dtype == torch.bool:
        mask64 = values["attn_mask"]
    absorbing = _absorbing_rows(mask64, (b, hq, lq, lk), spec.causal, tuple(spec.window))
    if spec.sinks is not None:
        absorbing[:] = False  # a sink keeps the LSE finite and ordinary
    go_layout, glse_layout = spec.grad_out, spec.grad_lse
    if bool(absorbing.any()):  # zeroed rows: no expanding along the rows or heads
        go_layout = go_layout.without_expand()
        glse_layout = None if glse_layout is None else glse_layout.without_expand()
    go_value = _randn(compact_shape(tuple(out.shape), go_layout), dtype, spec.seed, "grad_out")
    if bool(absorbing.any()):
        go_value = go_value.masked_fill(absorbing.transpose(1, 2)[..., None], 0.0)
    grad_out = place(go_value, tuple(out.shape), go_layout, device, seed=spec.seed)
    outputs, cotangents = [out], [grad_out.arg]
    grad_lse = None
    if glse_layout is not None:
        glse_value = _randn(compact_shape(tuple(lse.shape), glse_layout), lse.dtype, spec.seed, "grad_lse")
        glse_value = glse_value.masked_fill(absorbing, 0.0) if bool(absorbing.any()) else glse_value
        grad_lse = place(glse_value, tuple(lse.shape), glse_layout, device, seed=spec.seed)
        outputs.append(lse)
        cotangents.append(grad_lse.arg)
    with trace.capture() as calls:
        try:
            torch.autograd.backward(outputs, cotangents)
        except Exception as error:  # noqa: BLE001
            return failures + [f"backward raised {type(error).__name__}: {error}"]
    failures += _served(calls, "bwd")
    go_full = grad_out.value.expand(tuple(out.shape))
    glse_full = None if grad_lse is None else grad_lse.value.expand(tuple(lse.shape))
    names = sorted(differentiable, key=["q", "k", "v", "sinks", "attn_mask"].index)
    rounding = _rounding_effects(out, ref, ref_lse, [ref_leaves[n] for n in names], go_full)
    for outputs_, lse_, leaves, cot_dtype in ((ref, ref_lse, ref_leaves, torch.float64),
                                              (base, base_lse, base_leaves, None)):
        cots = [go_full.to(cot_dtype or out.dtype)]
        if glse_full is not None:
            cots.append(glse_full.to(cot_dtype or lse.dtype))
        torch.autograd.backward([outputs_, lse_][:len(cots)], cots)
    args64 = {n: (None if values[n] is None else (values[n] if values[n].dtype == torch.bool
                                                  else values[n].to(torch.float64)).expand(shapes[n]))
              for n in values}
    bounds = noise_bounds(args64["q"], args64["k"], args64["v"], out.detach().cpu().to(torch.float64),
                          go_full.to(torch.float64), None if glse_full is None else glse_full.to(torch.float64),
                          args64["attn_mask"], args64["alibi_slopes"], args64["sinks"], spec.causal,
                          tuple(spec.window), spec.softcap)
    for name, effect in zip(names, rounding):
        leaf_dtype = values[name].dtype
        algorithmic = effect + _reduce_bound(bounds.get(name), tuple(values[name].shape))
        failures += compare(f"d{name}", placed[name].grad(), ref_leaves[name].grad, base_leaves[name].grad,
                            GRADIENT_FACTOR, _coarser(dtype, leaf_dtype), algorithmic)
    failures += _inputs_unchanged(placed, "backward")
    return failures


def _cumulative(lengths: tuple) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)


def _run_varlen(spec: VarlenSpec, device) -> list[str]:
    import mfa_hf
    from . import trace
    from .kernels.reference import attention_reference_varlen

    dtype = dtype_of(spec.dtype)
    batch = len(spec.lengths_q)
    tq, tk = sum(spec.lengths_q), sum(spec.lengths_k)
    hq, hkv = spec.heads_q, spec.heads_kv
    full = {"B": batch, "H": hq}
    grads = spec.backward
    shapes = {"q": (tq, hq, spec.dim), "k": (tk, hkv, spec.dim), "v": (tk, hkv, spec.dim_v)}
    layouts = {"q": spec.q, "k": spec.k, "v": spec.v}
    values = {name: _randn(compact_shape(shapes[name], layouts[name]), dtype, spec.seed, name) for name in shapes}
    differentiable = {"q", "k", "v"} if grads else set()
    cu_q, cu_k = _cumulative(spec.lengths_q), _cumulative(spec.lengths_k)
    values["cu_seqlens_q"], shapes["cu_seqlens_q"], layouts["cu_seqlens_q"] = (
        cu_q.to(dtype_of(spec.cu_q.dtype)), (batch + 1,), spec.cu_q.layout)
    values["cu_seqlens_k"], shapes["cu_seqlens_k"], layouts["cu_seqlens_k"] = (
        cu_k.to(dtype_of(spec.cu_k.dtype)), (batch + 1,), spec.cu_k.layout)
    values["alibi_slopes"] = values["sinks"] = None
    if spec.alibi is not None:
        values["alibi_slopes"], shapes["alibi_slopes"] = _vector_values(spec.alibi, full, spec.seed, "alibi", True)
        layouts["alibi_slopes"] = spec.alibi.layout
    if spec.sinks is not None:
        values["sinks"], shapes["sinks"] = _vector_values(spec.sinks, full, spec.seed, "sinks", False)
        layouts["sinks"] = spec.sinks.layout
        if grads and spec.sinks.requires_grad:
            differentiable.add("sinks")
    placed = {name: None if value is None else place(value, shapes[name], layouts[name], device,
                                                     name in differentiable, spec.seed)
              for name, value in values.items()}
    arg = {name: None if p is None else p.arg for name, p in placed.items()}
    max_q = max(spec.lengths_q) + spec.extra_max
    max_k = max(spec.lengths_k) + spec.extra_max
    options = dict(causal=spec.causal, window_size=tuple(spec.window), softcap=spec.softcap)
    with trace.capture() as calls:
        try:
            out, lse = mfa_hf.flash_attn_varlen_func(
                arg["q"], arg["k"], arg["v"], arg["cu_seqlens_q"], arg["cu_seqlens_k"], max_q, max_k,
                alibi_slopes=arg["alibi_slopes"], sinks=arg["sinks"], return_lse=True, **options)
        except Exception as error:  # noqa: BLE001
            return [f"forward raised {type(error).__name__}: {error}"]
    failures = _served(calls, "fwd")

    def reference(upcast: bool):
        floats = {n: values[n] for n in ("q", "k", "v", "alibi_slopes", "sinks")}
        args, leaves = _leaf_copies(floats, upcast, tuple(differentiable), shapes)
        ref_out, ref_lse = attention_reference_varlen(
            args["q"], args["k"], args["v"], cu_q, cu_k, alibi_slopes=args["alibi_slopes"], sinks=args["sinks"],
            upcast=upcast, **options)
        return ref_out, ref_lse, leaves

    ref, ref_lse, ref_leaves = reference(True)
    base, base_lse, base_leaves = reference(False)
    factor = GRADIENT_FACTOR if spec.softcap > 0 else FORWARD_FACTOR
    failures += compare("out", out, ref.detach(), base.detach(), factor)
    failures += compare_lse(lse, ref_lse.detach(), base_lse.detach(), factor)
    failures += _inputs_unchanged(placed, "forward")
    if not grads:
        return failures

    grad_out = place(_randn(compact_shape(tuple(out.shape), spec.grad_out), dtype, spec.seed, "grad_out"),
                     tuple(out.shape), spec.grad_out, device, seed=spec.seed)
    outputs, cotangents = [out], [grad_out.arg]
    grad_lse = None
    if spec.grad_lse is not None:
        grad_lse = place(_randn(compact_shape(tuple(lse.shape), spec.grad_lse), lse.dtype, spec.seed, "grad_lse"),
                         tuple(lse.shape), spec.grad_lse, device, seed=spec.seed)
        outputs.append(lse)
        cotangents.append(grad_lse.arg)
    with trace.capture() as calls:
        try:
            torch.autograd.backward(outputs, cotangents)
        except Exception as error:  # noqa: BLE001
            return failures + [f"backward raised {type(error).__name__}: {error}"]
    failures += _served(calls, "bwd")
    go_full = grad_out.value.expand(tuple(out.shape))
    glse_full = None if grad_lse is None else grad_lse.value.expand(tuple(lse.shape))
    names = sorted(differentiable, key=["q", "k", "v", "sinks"].index)
    rounding = _rounding_effects(out, ref, ref_lse, [ref_leaves[n] for n in names], go_full)
    for outputs_, lse_, cot_dtype in ((ref, ref_lse, torch.float64), (base, base_lse, None)):
        cots = [go_full.to(cot_dtype or out.dtype)]
        if glse_full is not None:
            cots.append(glse_full.to(cot_dtype or lse.dtype))
        torch.autograd.backward([outputs_, lse_][:len(cots)], cots)
    bounds = _varlen_bounds(spec, values, shapes, out.detach().cpu().to(torch.float64), go_full, glse_full, cu_q, cu_k)
    for name, effect in zip(names, rounding):
        algorithmic = effect + _reduce_bound(bounds.get(name), tuple(values[name].shape))
        failures += compare(f"d{name}", placed[name].grad(), ref_leaves[name].grad, base_leaves[name].grad,
                            GRADIENT_FACTOR, _coarser(dtype, values[name].dtype), algorithmic)
    failures += _inputs_unchanged(placed, "backward")
    return failures


def _varlen_bounds(spec: VarlenSpec, values, shapes, out64, go_full, glse_full, cu_q, cu_k) -> dict:
    """noise_bounds per sequence, written into packed tensors (sinks: summed over sequences)."""
    q, k, v = (values[n].to(torch.float64).expand(shapes[n]) for n in ("q", "k", "v"))
    bounds = {"q": torch.zeros(q.shape, dtype=torch.float64), "k": torch.zeros(k.shape, dtype=torch.float64),
              "v": torch.zeros(v.shape, dtype=torch.float64)}
    sinks = None if values["sinks"] is None else values["sinks"].to(torch.float64).expand(shapes["sinks"])
    slopes = None if values["alibi_slopes"] is None else values["alibi_slopes"].to(torch.float64).expand(
        shapes["alibi_slopes"])
    if sinks is not None:
        bounds["sinks"] = torch.zeros(sinks.shape, dtype=torch.float64)
    go = go_full.to(torch.float64)
    for seq, (qs, qe, ks, ke) in enumerate(zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:])):
        if qe == qs:
            continue
        seq_slopes = None if slopes is None else (slopes[seq] if slopes.dim() == 2 else slopes)
        glse = None if glse_full is None else glse_full[None, :, qs:qe].to(torch.float64)
        part = noise_bounds(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], out64[None, qs:qe], go[None, qs:qe], glse,
                            None, seq_slopes, sinks, spec.causal, tuple(spec.window), spec.softcap)
        bounds["q"][qs:qe] = part["q"][0]
        bounds["k"][ks:ke] = part["k"][0]
        bounds["v"][ks:ke] = part["v"][0]
        if sinks is not None:
            bounds["sinks"] += part["sinks"]
    return bounds


def _run_kvcache(spec: KVCacheSpec, device) -> list[str]:
    import mfa_hf
    from . import trace
    from .kernels.reference import attention_reference

    dtype = dtype_of(spec.dtype)
    batch, lq, new, hq, hkv = spec.batch, spec.lq, spec.new, spec.heads_q, spec.heads_kv
    appending = new > 0 and spec.seqlens != "none"
    new = new if appending else 0
    lengths = list(spec.lengths)
    if spec.seqlens == "int":
        lengths = [lengths[0]] * batch
    if spec.seqlens == "none":
        lengths = [spec.capacity] * batch
    if spec.seqlens == "tensor" and spec.seqlens_index.layout.expand:
        lengths = [lengths[0]] * batch  # one stored length, expanded
    rows = list(spec.batch_idx) if spec.batch_idx is not None else list(range(batch))
    if spec.batch_idx is not None and spec.batch_idx_index.layout.expand:
        if appending:
            raise ValueError("KVCacheSpec: an expanded cache_batch_idx repeats a row, which appending forbids")
        rows = [rows[0]] * batch
    cache_rows = spec.cache_rows if spec.batch_idx is not None else batch
    shapes = {"q": (batch, lq, hq, spec.dim), "k_cache": (cache_rows, spec.capacity, hkv, spec.dim),
              "v_cache": (cache_rows, spec.capacity, hkv, spec.dim_v)}
    layouts = {"q": spec.q, "k_cache": spec.k_cache, "v_cache": spec.v_cache}
    if appending:
        shapes.update(k=(batch, new, hkv, spec.dim), v=(batch, new, hkv, spec.dim_v))
        layouts.update(k=spec.k_new, v=spec.v_new)
    values = {name: _randn(compact_shape(shapes[name], layouts[name]), dtype, spec.seed, name) for name in shapes}
    if spec.nan_q and values["q"].numel():
        g = _generator(spec.seed, "nan")
        index = tuple(int(torch.randint(n, (1,), generator=g)) for n in values["q"].shape)
        values["q"][index] = float("nan")
    full = {"B": batch, "H": hq}
    for name, vector, positive in (("alibi_slopes", spec.alibi, True), ("sinks", spec.sinks, False)):
        if vector is not None:
            values[name], shapes[name] = _vector_values(vector, full, spec.seed, name, positive)
            layouts[name] = vector.layout
    if spec.seqlens == "tensor":
        layout = spec.seqlens_index.layout
        values["cache_seqlens"] = torch.tensor(lengths[:1] if layout.expand else lengths,
                                               dtype=dtype_of(spec.seqlens_index.dtype))
        shapes["cache_seqlens"], layouts["cache_seqlens"] = (batch,), layout
    if spec.batch_idx is not None:
        layout = spec.batch_idx_index.layout
        values["cache_batch_idx"] = torch.tensor(rows[:1] if layout.expand else rows,
                                                 dtype=dtype_of(spec.batch_idx_index.dtype))
        shapes["cache_batch_idx"], layouts["cache_batch_idx"] = (batch,), layout
    placed = {name: place(value, shapes[name], layouts[name], device, seed=spec.seed) for name, value in values.items()}
    arg = {name: placed[name].arg if name in placed else None
           for name in ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens", "cache_batch_idx", "alibi_slopes",
                        "sinks")}
    seqlens = {"tensor": arg["cache_seqlens"], "int": lengths[0], "none": None}[spec.seqlens]
    with trace.capture() as calls:
        try:
            out, lse = mfa_hf.flash_attn_with_kvcache(
                arg["q"], arg["k_cache"], arg["v_cache"], arg["k"], arg["v"], cache_seqlens=seqlens,
                cache_batch_idx=arg["cache_batch_idx"], causal=spec.causal, window_size=tuple(spec.window),
                softcap=spec.softcap, alibi_slopes=arg["alibi_slopes"], sinks=arg["sinks"], return_lse=True,
                num_splits=spec.num_splits)
        except Exception as error:  # noqa: BLE001
            return [f"call raised {type(error).__name__}: {error}"]
    failures = _served(calls, "decode")
    expected = {}
    for side in ("k", "v"):
        cache = values[f"{side}_cache"].expand(shapes[f"{side}_cache"]).clone()
        for bi, row in enumerate(rows):
            if appending:
                cache[row, lengths[bi]: lengths[bi] + new] = values[side].expand(shapes[side])[bi]
        expected[side] = cache
    totals = [n + new for n in lengths]
    refs = {}
    for upcast in (True, False):
        cast = (lambda t: None if t is None else t.to(torch.float64)) if upcast else (lambda t: t)
        slopes = None if "alibi_slopes" not in values else values["alibi_slopes"].expand(shapes["alibi_slopes"])
        sinks = None if "sinks" not in values else cast(values["sinks"].expand(shapes["sinks"]))
        outs, lses = [], []
        for bi, (row, total) in enumerate(zip(rows, totals)):
            seq_slopes = None if slopes is None else cast(slopes[bi] if slopes.dim() == 2 else slopes)
            o, l = attention_reference(
                cast(values["q"].expand(shapes["q"])[bi: bi + 1]), cast(expected["k"][row: row + 1, :total]),
                cast(expected["v"][row: row + 1, :total]), causal=spec.causal, window_size=tuple(spec.window),
                softcap=spec.softcap, alibi_slopes=seq_slopes, sinks=sinks, upcast=upcast)
            outs.append(o)
            lses.append(l)
        refs[upcast] = (torch.cat(outs), torch.cat(lses))
    factor = GRADIENT_FACTOR if spec.softcap > 0 else FORWARD_FACTOR
    failures += compare("out", out, refs[True][0], refs[False][0], factor)
    failures += compare_lse(lse, refs[True][1], refs[False][1], factor)
    for side in ("k", "v"):
        cache = placed[f"{side}_cache"]
        want = cache.snapshot.cpu().clone()
        if appending:
            _chain(want, compact_shape(cache.shape, cache.layout), cache.layout).copy_(expected[side])
        if not torch.equal(_bits(cache.flat.cpu()), _bits(want)):
            got = _chain(cache.flat.cpu(), compact_shape(cache.shape, cache.layout), cache.layout)
            inside = (_bits(got) != _bits(expected[side])).sum() if appending else "n/a"
            failures.append(f"{side}_cache ({cache.layout.name}): its buffer after the call differs from the expected "
                            f"append ({inside} elements of the cache view differ; the rest are gaps or the buffer's "
                            f"ends)")
    failures += _inputs_unchanged({n: p for n, p in placed.items() if n not in ("k_cache", "v_cache")}, "call")
    return failures


# ----------------------------------------------------------------------------------------------
# Running specs in a worker process per backend (crash isolation, the backend's environment)


def prepare_process() -> None:
    """What the tests' fixtures do, for a worker: poisoned outputs; small tiles for the torch backend."""
    from . import ops

    ops.POISON_OUTPUTS = True
    if current_backend() == "torch":
        from .kernels.torch import tiles

        tiles.TILING = tiles.Tiling(score_block_elements=64, key_tile=8, min_query_tile=4, max_query_tile=8)


def _send(stream, obj) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _read_exact(stream, count: int) -> bytes | None:
    chunks, left = [], count
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(stream):
    header = _read_exact(stream, 8)
    if header is None:
        return None
    data = _read_exact(stream, struct.unpack("<Q", header)[0])
    return None if data is None else pickle.loads(data)


def worker_main() -> None:
    """A worker's loop: read a spec, run it, answer ("ok", failures) or ("error", traceback)."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # prints (Python's or a kernel's) go to stderr, never into the replies
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer
    prepare_process()
    while True:
        spec = _recv(requests)
        if spec is None:
            return
        try:
            reply = ("ok", run_spec(spec))
        except SpecNotApplicable as reason:
            reply = ("skip", str(reason))
        except BaseException:  # noqa: BLE001 - reported to the parent
            reply = ("error", traceback.format_exc())
        _send(replies, reply)


def worker_environment(backend: str) -> dict:
    env = dict(os.environ, MFA_BACKEND=backend)
    env.pop("MFA_TRACE", None)
    if backend == "metal" and not torch.backends.mps.is_available():
        env["MFA_METAL_EMULATOR"] = "1"
    if backend == "triton" and os.environ.get("MFA_TRITON_FULL") != "1":
        env["TRITON_INTERPRET"] = "1"
    return env


class IsolatedRunner:
    """Runs specs in a worker process with `backend`'s environment. A worker that dies (a kernel
    aborting, a segfault) or hangs fails that spec; the next spec starts a fresh worker."""

    def __init__(self, backend: str, timeout: float = 600.0):
        self.backend = backend
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix=f"mfa-layouts-{backend}-", suffix=".log", delete=False)
        self.starts = 0

    def _start(self) -> None:
        self.close()
        self.starts += 1
        code = "from mfa_hf.testing_layouts import worker_main; worker_main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.log.name, "ab"), env=worker_environment(self.backend),
                                     bufsize=0)

    def _stderr_since(self, mark: int, lines: int = 20) -> str:
        with open(self.log.name, "rb") as log:
            log.seek(mark)
            text = log.read().decode(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def run(self, spec) -> list[str]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        mark = os.path.getsize(self.log.name)
        try:
            _send(self.proc.stdin, spec)
        except (BrokenPipeError, OSError):
            pass  # the worker is gone: reported below
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            self.close()
            return [f"the {self.backend} worker timed out after {self.timeout:.0f} s on this case"]
        reply = _recv(self.proc.stdout)
        if reply is None:
            code = self.proc.wait()
            self.proc = None
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            tail = self._stderr_since(mark)
            return [f"the {self.backend} worker process died ({how}) running this case; its stderr:\n{tail}"]
        status, payload = reply
        if status == "skip":
            raise SpecNotApplicable(payload)
        if status == "error":
            return [f"the harness raised in the {self.backend} worker:\n{payload}"]
        return payload

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __del__(self):
        try:
            self.close()
            os.unlink(self.log.name)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# ----------------------------------------------------------------------------------------------
# The targeted cases: one argument at a time in each layout and dtype, and the semantic cases


@dataclass(frozen=True)
class Target:
    """A named case. core (the CORE ids): in the default run of every backend, triton's interpreter
    included; slow: only under --run-slow, on every backend (the rest of a product whose rotation runs
    by default). The others run by default on torch and metal, under --run-slow on triton."""

    id: str
    spec: object
    core: bool = False
    slow: bool = False
    backends: tuple = ("torch", "metal", "triton")


MASK_ORDER = {4: (0, 1, 3, 2), 3: (0, 2, 1), 2: (1, 0)}
MASK_DIMS = (("B", "H", "Lq", "Lk"), ("B", "1", "Lq", "Lk"), ("1", "1", "Lq", "Lk"), ("Lq", "Lk"),
             ("B", "1", "1", "Lk"), ("1", "H", "Lq", "Lk"))
MASK_FILLS = ("-inf", "finfo.min", "finfo32.min")
LAYOUT_KINDS = ("contiguous", "transposed", "sliced", "offset", "expanded", "mixed")


def _mask_layout(kind: str, dims: tuple) -> Layout:
    ones = tuple(j for j, d in enumerate(dims) if d == "1")
    return named_layout(kind, len(dims), ones if kind in ("expanded", "mixed") else (), MASK_ORDER[len(dims)])


def _dense_targets() -> list[Target]:
    targets = []
    qkv = (("transposed", ()), ("permuted", ()), ("sliced", ()), ("offset", ()), ("expanded", (0,)),
           ("expanded", (2,)), ("mixed", (0,)))
    for a, name in enumerate(("q", "k", "v")):
        for n, (kind, expand) in enumerate(qkv):
            layout = named_layout(kind, 4, expand)
            spec = DenseSpec(dtype=KERNEL_DTYPES[(n + a) % 3], causal=n % 2 == 1, **{name: layout})
            targets.append(Target(f"dense-{name}-{layout.name}-{spec.dtype}", spec))
    n = 0  # bool masks: every broadcast shape x layout (half of them by default)
    for d, dims in enumerate(MASK_DIMS):
        for k, kind in enumerate(LAYOUT_KINDS):
            if kind == "expanded" and "1" not in dims:
                continue
            mask = MaskSpec("bool", dims, _mask_layout(kind, dims))
            spec = DenseSpec(dtype=KERNEL_DTYPES[n % 3], causal=n % 4 == 1, mask=mask, sinks=VectorSpec() if n % 5 == 2
                             else None)
            slow = (d + k) % 2 == 1
            targets.append(Target(f"dense-attn_mask-{mask.name}", spec, slow=slow))
            n += 1
    n = 0  # additive masks: dtype x layout x fill (the fills rotated by default)
    for t, mask_dtype in enumerate(FLOAT_NAMES):
        for k, kind in enumerate(LAYOUT_KINDS):
            for f, fill in enumerate(MASK_FILLS):
                dims = MASK_DIMS[(t + k + f) % len(MASK_DIMS)]
                if kind == "expanded" and "1" not in dims:
                    dims = ("B", "1", "Lq", "Lk")
                mask = MaskSpec(mask_dtype, dims, _mask_layout(kind, dims), fill)
                spec = DenseSpec(dtype=KERNEL_DTYPES[n % 3], causal=n % 4 == 3, mask=mask)
                slow = f != (t + k) % 3
                targets.append(Target(f"dense-attn_mask-{mask.name}", spec, slow=slow))
                n += 1
    n = 0  # alibi slopes: shape x layout x dtype (dtypes rotated by default)
    for dims, kinds in ((("H",), ("contiguous", "sliced", "offset", "expanded")),
                        (("B", "H"), ("contiguous", "transposed", "sliced", "offset", "expanded", "expanded1",
                                      "mixed"))):
        for k, kind in enumerate(kinds):
            for t, dt in enumerate(FLOAT_NAMES):
                expand = (1,) if kind == "expanded1" else (0,) if kind in ("expanded", "mixed") else ()
                layout = named_layout(kind.rstrip("1"), len(dims), expand)
                alibi = VectorSpec(dt, layout, dims)
                spec = DenseSpec(dtype=KERNEL_DTYPES[n % 3], causal=n % 2 == 0, alibi=alibi)
                slow = t != (k + len(dims)) % 4
                targets.append(Target(f"dense-alibi_slopes-{alibi.name}", spec, slow=slow))
                n += 1
    for n, (k, kind, t, dt) in enumerate((k, kind, t, dt) for k, kind in enumerate(("contiguous", "sliced", "offset",
                                                                                   "expanded"))
                                         for t, dt in enumerate(FLOAT_NAMES)):
        sinks = VectorSpec(dt, named_layout(kind, 1, (0,) if kind == "expanded" else ()))
        spec = DenseSpec(dtype=KERNEL_DTYPES[n % 3], causal=n % 2 == 1, sinks=sinks, grad_lse=CONTIGUOUS)
        slow = (t - k) % 2 == 1
        targets.append(Target(f"dense-sinks-{sinks.name}", spec, slow=slow))
    for n, (kind, expand) in enumerate((("transposed", ()), ("permuted", ()), ("sliced", ()), ("offset", ()),
                                        ("expanded", (0, 1, 2, 3)), ("mixed", (0,)))):
        layout = named_layout(kind, 4, expand)
        spec = DenseSpec(dtype=KERNEL_DTYPES[n % 3], sinks=VectorSpec() if n % 2 else None, grad_out=layout)
        targets.append(Target(f"dense-grad_out-{layout.name}-{spec.dtype}", spec))
    for n, (kind, expand) in enumerate((("transposed", ()), ("sliced", ()), ("offset", ()), ("expanded", (0, 1, 2)))):
        layout = named_layout(kind, 3, expand, order=(0, 2, 1))
        spec = DenseSpec(dtype=KERNEL_DTYPES[n % 3], sinks=VectorSpec(), grad_lse=layout)
        targets.append(Target(f"dense-grad_lse-{layout.name}-{spec.dtype}", spec))
    for kind in ("transposed", "mixed"):
        layout = named_layout(kind, 4, (0,) if kind == "mixed" else ())
        spec = DenseSpec(dtype="float64", q=layout, k=layout, v=layout, sinks=VectorSpec("float64"),
                         mask=MaskSpec("float64", ("B", "1", "Lq", "Lk"), _mask_layout(kind, ("B", "1", "Lq", "Lk"))),
                         grad_lse=CONTIGUOUS)
        targets.append(Target(f"dense-qkv_float64-{layout.name}", spec, backends=("torch",)))
    return targets


def _semantic_targets() -> list[Target]:
    targets = []
    for dt in KERNEL_DTYPES:
        targets.append(Target(f"semantics-nan_q-plain-{dt}", DenseSpec(dtype=dt, nan_q=True)))
        targets.append(Target(f"semantics-nan_q-causal_no_key_rows_sinks-{dt}",
                              DenseSpec(dtype=dt, lq=9, lk=5, causal=True, sinks=VectorSpec(), nan_q=True, seed=1)))
        targets.append(Target(f"semantics-nan_q-bool_mask_empty_rows-{dt}",
                              DenseSpec(dtype=dt, mask=MaskSpec("bool"), nan_q=True, seed=2)))
    # A row masked everywhere by finfo(float32).min averages V (the additive mask is added exactly).
    for n, (mask_dtype, fill) in enumerate((("float32", "finfo32.min"), ("bfloat16", "finfo.min"),
                                            ("float64", "finfo32.min"), ("float16", "finfo.min"))):
        mask = MaskSpec(mask_dtype, ("B", "1", "Lq", "Lk"), fill=fill)
        spec = DenseSpec(dtype=KERNEL_DTYPES[n % 3], mask=mask, seed=3)
        targets.append(Target(f"semantics-finfo_min_row_mean_of_v-{mask_dtype}-{fill}-{spec.dtype}", spec))
    # A padding mask as transformers writes it: (B, 1, 1, Lk), finfo.min over padded keys; one sequence
    # padded entirely (every row of it averages V).
    mask = MaskSpec("float32", ("B", "1", "1", "Lk"), fill="finfo.min")
    targets.append(Target("semantics-finfo_min_padding_mask-float32", DenseSpec(mask=mask, seed=4)))
    for sinks in (None, VectorSpec()):
        spec = DenseSpec(mask=MaskSpec("bool"), sinks=sinks, grad_lse=CONTIGUOUS, seed=5)
        targets.append(Target(f"semantics-bool_empty_row_zero{'-sinks' if sinks else ''}", spec))
    for dt in ("float32", "float16"):
        spec = DenseSpec(dtype=dt, lk=0, sinks=VectorSpec(), grad_lse=CONTIGUOUS)
        targets.append(Target(f"semantics-lk0_sinks_grad-{dt}", spec))
    targets.append(Target("semantics-lk0_no_sinks", DenseSpec(lk=0, grad_lse=CONTIGUOUS)))
    targets.append(Target("semantics-lq0_sinks", DenseSpec(lq=0, sinks=VectorSpec(), grad_lse=CONTIGUOUS)))
    spec = DenseSpec(lq=9, lk=4, causal=True, sinks=VectorSpec(), grad_lse=CONTIGUOUS)
    targets.append(Target("semantics-causal_rows_without_keys_sinks_grad_lse", spec))
    # softcap 50 (Gemma 2's) in float32: the cap multiplies any absolute error of tanh(s / cap) by 50
    # (found by the fuzz on triton, whose tanh is 1 - 2 / (e^2x + 1)).
    targets.append(Target("semantics-softcap50-float32", DenseSpec(softcap=50.0, seed=1)))
    return targets


def _varlen_targets() -> list[Target]:
    targets = []
    kinds = (("contiguous", "int64"), ("sliced", "int32"), ("sliced", "int64"), ("offset", "int32"),
             ("offset", "int64"), ("mixed", "int32"))
    for name in ("cu_q", "cu_k"):
        for n, (kind, dt) in enumerate(kinds):
            index = IndexSpec(dt, named_layout(kind, 1))
            spec = VarlenSpec(dtype=KERNEL_DTYPES[n % 3], causal=n % 2 == 0, **{name: index})
            api_name = {"cu_q": "cu_seqlens_q", "cu_k": "cu_seqlens_k"}[name]
            targets.append(Target(f"varlen-{api_name}-{index.name}", spec))
    qkv = (("transposed", ()), ("permuted", ()), ("sliced", ()), ("offset", ()), ("expanded", (1,)))
    for a, name in enumerate(("q", "k", "v")):
        for n, (kind, expand) in enumerate(qkv):
            layout = named_layout(kind, 3, expand)
            spec = VarlenSpec(dtype=KERNEL_DTYPES[(n + a) % 3], causal=n % 2 == 1, **{name: layout})
            targets.append(Target(f"varlen-{name}-{layout.name}-{spec.dtype}", spec))
    for n, (dims, kind, dt) in enumerate(((("B", "H"), "transposed", "float32"), (("B", "H"), "expanded", "float64"),
                                          (("B", "H"), "sliced", "float16"), (("H",), "offset", "float64"))):
        alibi = VectorSpec(dt, named_layout(kind, len(dims), (0,) if kind == "expanded" else ()), dims)
        targets.append(Target(f"varlen-alibi_slopes-{alibi.name}",
                              VarlenSpec(dtype=KERNEL_DTYPES[n % 3], causal=True, alibi=alibi)))
    for n, (kind, dt) in enumerate((("sliced", "float32"), ("sliced", "float64"), ("offset", "float16"),
                                    ("expanded", "bfloat16"))):
        sinks = VectorSpec(dt, named_layout(kind, 1, (0,) if kind == "expanded" else ()))
        targets.append(Target(f"varlen-sinks-{sinks.name}",
                              VarlenSpec(dtype=KERNEL_DTYPES[n % 3], sinks=sinks, grad_lse=CONTIGUOUS)))
    for n, (kind, expand) in enumerate((("transposed", ()), ("sliced", ()), ("expanded", (0, 1, 2)))):
        layout = named_layout(kind, 3, expand)
        targets.append(Target(f"varlen-grad_out-{layout.name}", VarlenSpec(dtype=KERNEL_DTYPES[n % 3], grad_out=layout)))
    for kind in ("transposed", "sliced"):
        layout = named_layout(kind, 2)
        targets.append(Target(f"varlen-grad_lse-{layout.name}", VarlenSpec(sinks=VectorSpec(), grad_lse=layout)))
    # Sequences without keys (and without queries): the sink's gradient still flows through the LSE.
    for dt in ("float32", "bfloat16"):
        spec = VarlenSpec(dtype=dt, lengths_q=(3, 4, 0, 5), lengths_k=(0, 6, 2, 0), sinks=VectorSpec(),
                          grad_lse=CONTIGUOUS)
        targets.append(Target(f"semantics-varlen_empty_keys_sinks_grad-{dt}", spec))
    targets.append(Target("varlen-extra_max_seqlen", VarlenSpec(extra_max=5, causal=True)))
    # Every row sees one key (P = 1, dV = dO): found by the fuzz on triton's interpreter, whose float32 ->
    # bfloat16 cast truncates, so P.to(bfloat16) before dV = P^T dO gives 0.99609375 for P = 0.99999.
    spec = VarlenSpec(dtype="bfloat16", lengths_q=(3, 9, 4), lengths_k=(3, 9, 4), heads_q=2, dim=24, dim_v=23,
                      causal=True, window=(0, 0), q=Layout(expand=(0, 1)), seed=1)
    targets.append(Target("varlen-q-expanded01-bfloat16-one_key_per_row", spec))
    return targets


def _kvcache_targets() -> list[Target]:
    targets = []
    batch_idx = dict(batch_idx=(4, 0, 2), cache_rows=5)
    q_kinds = (("transposed", ()), ("permuted", ()), ("sliced", ()), ("offset", ()), ("expanded", (0,)))
    for n, (kind, expand) in enumerate(q_kinds):
        layout = named_layout(kind, 4, expand)
        spec = KVCacheSpec(dtype=KERNEL_DTYPES[n % 3], lq=1 + 2 * (n % 2), q=layout)
        targets.append(Target(f"kvcache-q-{layout.name}-{spec.dtype}", spec))
    cache_kinds = ("transposed", "permuted", "sliced", "offset", "mixed")
    for a, name in enumerate(("k_cache", "v_cache")):
        for n, kind in enumerate(cache_kinds):
            layout = named_layout(kind, 4)
            spec = KVCacheSpec(dtype=KERNEL_DTYPES[(n + a) % 3], lq=1 + (n % 2), new=1 + (n % 2),
                               **({name: layout}), **(batch_idx if n == 4 else {}))
            targets.append(Target(f"kvcache-{name}-{layout.name}-{spec.dtype}", spec))
        layout = named_layout("expanded", 4, (0,))
        spec = KVCacheSpec(new=0, seqlens="none", **{name: layout})
        targets.append(Target(f"kvcache-{name}-{layout.name}-no_append", spec))
    for name in ("k_new", "v_new"):
        for n, (kind, expand) in enumerate((("transposed", ()), ("sliced", ()), ("offset", ()), ("expanded", (2,)))):
            layout = named_layout(kind, 4, expand)
            spec = KVCacheSpec(dtype=KERNEL_DTYPES[n % 3], lq=2, new=2, **{name: layout})
            targets.append(Target(f"kvcache-{name.replace('_new', '')}-{layout.name}-{spec.dtype}", spec))
    # With an append the API computes lengths + new (a fresh tensor); without one the argument itself
    # reaches the kernel, so both are cases.
    for n, (kind, dt, new) in enumerate((k, d, new) for k in ("contiguous", "sliced", "offset", "expanded")
                                        for d in INT_NAMES for new in (1, 0)):
        index = IndexSpec(dt, named_layout(kind, 1, (0,) if kind == "expanded" else ()))
        spec = KVCacheSpec(dtype=KERNEL_DTYPES[n % 3], seqlens_index=index, new=new,
                           lengths=(7, 7, 7) if kind == "expanded" else (0, 9, 20))
        targets.append(Target(f"kvcache-cache_seqlens-{index.name}{'' if new else '-no_append'}", spec))
    targets.append(Target("kvcache-cache_seqlens-int", KVCacheSpec(seqlens="int", lengths=(11, 11, 11))))
    targets.append(Target("kvcache-cache_seqlens-none", KVCacheSpec(seqlens="none", new=0)))
    for n, (kind, dt, new) in enumerate((k, d, new) for k in ("contiguous", "sliced", "offset") for d in INT_NAMES
                                        for new in (1, 0)):
        index = IndexSpec(dt, named_layout(kind, 1))
        spec = KVCacheSpec(dtype=KERNEL_DTYPES[n % 3], batch_idx_index=index, new=new, **batch_idx)
        targets.append(Target(f"kvcache-cache_batch_idx-{index.name}{'' if new else '-no_append'}", spec))
    index = IndexSpec("int64", named_layout("expanded", 1, (0,)))
    targets.append(Target("kvcache-cache_batch_idx-expanded0-int64-no_append",
                          KVCacheSpec(batch_idx_index=index, new=0, **batch_idx)))
    for n, (dims, kind, dt) in enumerate(((("B", "H"), "transposed", "float32"), (("B", "H"), "expanded", "float64"),
                                          (("H",), "sliced", "float64"), (("H",), "offset", "float16"))):
        alibi = VectorSpec(dt, named_layout(kind, len(dims), (0,) if kind == "expanded" else ()), dims)
        targets.append(Target(f"kvcache-alibi_slopes-{alibi.name}", KVCacheSpec(dtype=KERNEL_DTYPES[n % 3], alibi=alibi)))
    for n, (kind, dt) in enumerate((("sliced", "float32"), ("sliced", "float64"), ("offset", "float16"),
                                    ("expanded", "bfloat16"))):
        sinks = VectorSpec(dt, named_layout(kind, 1, (0,) if kind == "expanded" else ()))
        targets.append(Target(f"kvcache-sinks-{sinks.name}", KVCacheSpec(dtype=KERNEL_DTYPES[n % 3], sinks=sinks)))
    mixed = named_layout("mixed", 4)
    spec = KVCacheSpec(lq=3, new=3, window=(5, -1), num_splits=3, q=mixed, k_cache=mixed, v_cache=mixed,
                       k_new=mixed, v_new=mixed, seqlens_index=IndexSpec("int64", named_layout("mixed", 1)),
                       batch_idx_index=IndexSpec("int64", named_layout("sliced", 1)), **batch_idx,
                       alibi=VectorSpec("float64", named_layout("transposed", 2), ("B", "H")),
                       sinks=VectorSpec("float16", named_layout("sliced", 1)))
    targets.append(Target("kvcache-everything_mixed", spec))
    for dt in KERNEL_DTYPES:
        targets.append(Target(f"semantics-kvcache_nan_q-{dt}", KVCacheSpec(dtype=dt, lq=2, nan_q=True)))
    return targets


# What triton's interpreter runs by default (about a second a case): every argument once, the cases
# that found bugs before, and the semantic rules.
CORE = frozenset((
    "dense-q-transposed0213+sliced2111+offset5+expanded0-float16", "dense-k-transposed3210-float32",
    "dense-v-expanded2-bfloat16", "dense-attn_mask-(B,1,Lq,Lk)-transposed0132+sliced2111+offset5+expanded1-bool",
    "dense-attn_mask-(B,H,Lq,Lk)-offset3-float64--inf", "dense-attn_mask-(B,1,Lq,Lk)-sliced3112-float64-finfo32.min",
    "dense-attn_mask-(Lq,Lk)-sliced32-bfloat16--inf", "dense-alibi_slopes-(B,H)-transposed10-float64",
    "dense-alibi_slopes-(B,H)-expanded0-float32", "dense-sinks-(H)-sliced2-float32", "dense-sinks-(H)-expanded0-float16",
    "dense-grad_out-expanded0123-bfloat16", "dense-grad_lse-transposed021-float16",
    "semantics-nan_q-causal_no_key_rows_sinks-bfloat16", "semantics-finfo_min_row_mean_of_v-float32-finfo32.min-float16",
    "semantics-finfo_min_padding_mask-float32", "semantics-bool_empty_row_zero-sinks", "semantics-lk0_sinks_grad-float32",
    "semantics-softcap50-float32",
    "varlen-cu_seqlens_q-sliced2-int32", "varlen-cu_seqlens_k-offset3-int64", "varlen-cu_seqlens_q-contiguous-int64",
    "varlen-k-transposed210-float32", "varlen-alibi_slopes-(B,H)-transposed10-float32", "varlen-sinks-(H)-sliced2-float32",
    "semantics-varlen_empty_keys_sinks_grad-float32", "varlen-q-expanded01-bfloat16-one_key_per_row",
    "kvcache-k_cache-transposed0213+sliced2111+offset5-bfloat16", "kvcache-v_cache-transposed3210-float32",
    "kvcache-k-offset3-float32", "kvcache-cache_seqlens-sliced2-int32-no_append", "kvcache-cache_seqlens-expanded0-int32-no_append",
    "kvcache-cache_batch_idx-sliced2-int32", "kvcache-cache_batch_idx-offset3-int64-no_append",
    "kvcache-alibi_slopes-(B,H)-transposed10-float32",
    "kvcache-sinks-(H)-sliced2-float32", "kvcache-everything_mixed", "semantics-kvcache_nan_q-float16",
))


def targeted_cases() -> list[Target]:
    """Every targeted case (ids unique); `core` marks the CORE ids."""
    targets = _dense_targets() + _semantic_targets() + _varlen_targets() + _kvcache_targets()
    ids = [t.id for t in targets]
    missing = CORE - set(ids)
    if missing or len(set(ids)) != len(ids):
        raise AssertionError(f"targeted_cases: CORE names unknown ids {sorted(missing)} or ids repeat (harness bug)")
    return [replace(t, core=t.id in CORE, slow=t.slow and t.id not in CORE) for t in targets]


# ----------------------------------------------------------------------------------------------
# Hypothesis strategies: every argument's layout and dtype drawn at once (hypothesis is a test
# dependency: imported here, not at the module's top)


def layouts(rank: int, expandable: tuple = ()):
    """Any memory order, steps of 1-3 per dim, an offset, and stride 0 over some of `expandable`."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw):
        order = tuple(draw(st.permutations(range(rank)))) if rank > 1 and draw(st.booleans()) else ()
        steps = tuple(draw(st.sampled_from((1, 1, 2, 3))) for _ in range(rank)) if draw(st.booleans()) else ()
        offset = draw(st.sampled_from((0, 0, 1, 3, 8)))
        expand = ()
        if expandable and draw(st.booleans()):
            expand = tuple(sorted(draw(st.sets(st.sampled_from(tuple(expandable)), min_size=1))))
        return Layout(order, steps, offset, expand)

    return build()


def _rarely():
    from hypothesis import strategies as st

    return st.sampled_from((False,) * 9 + (True,))  # st.integers(0, 9) == 0 would favour its bound, 0


def _sizes(backend: str) -> dict:
    """Shape bounds: the triton interpreter pays per program instance, so it gets fewer and smaller."""
    if backend == "triton":
        return dict(batch=2, group=2, length=20, dim=24, sequences=3, seq_length=10)
    return dict(batch=3, group=3, length=24, dim=40, sequences=4, seq_length=12)


def _options(draw):
    from hypothesis import strategies as st

    return dict(causal=draw(st.booleans()),
                window=draw(st.sampled_from(((-1, -1), (-1, -1), (0, 0), (3, -1), (-1, 2), (4, 1)))),
                softcap=draw(st.sampled_from((0.0, 0.0, 1.5, 20.0))))


def _vector_spec(draw, dims_choices, requires_grad=True):
    from hypothesis import strategies as st

    dims = draw(st.sampled_from(dims_choices))
    return VectorSpec(draw(st.sampled_from(FLOAT_NAMES)), draw(layouts(len(dims), tuple(range(len(dims))))), dims,
                      requires_grad=requires_grad and draw(st.booleans()))


def _mask_spec(draw):
    from hypothesis import strategies as st

    broadcast = [draw(st.booleans()) for _ in range(4)]
    leading = next((d for d, b in enumerate(broadcast) if not b), 4)
    rank = draw(st.integers(max(2, 4 - leading), 4))
    dims = tuple("1" if b else name for b, name in zip(broadcast, FULL_DIMS))[4 - rank:]
    ones = tuple(j for j, d in enumerate(dims) if d == "1")
    return MaskSpec(draw(st.sampled_from(("bool", "bool") + FLOAT_NAMES)), dims, draw(layouts(rank, ones)),
                    draw(st.sampled_from(MASK_FILLS)), draw(st.booleans()), draw(st.booleans()))


def dense_specs(backend: str = "torch"):
    from hypothesis import strategies as st

    size = _sizes(backend)
    dtypes = KERNEL_DTYPES + (("float64",) if backend == "torch" else ())

    @st.composite
    def build(draw):
        heads_kv = draw(st.integers(1, 2))
        nan_q = draw(_rarely())
        return DenseSpec(
            dtype=draw(st.sampled_from(dtypes)), batch=draw(st.integers(1, size["batch"])),
            lq=draw(st.integers(0, size["length"])), lk=draw(st.integers(0, size["length"])),
            heads_q=heads_kv * draw(st.integers(1, size["group"])), heads_kv=heads_kv,
            dim=draw(st.integers(1, size["dim"])), dim_v=draw(st.integers(1, size["dim"])), **_options(draw),
            q=draw(layouts(4, (0, 2))), k=draw(layouts(4, (0, 2))), v=draw(layouts(4, (0, 2))),
            mask=draw(st.one_of(st.none(), st.composite(_mask_spec)())),
            alibi=draw(st.one_of(st.none(), st.composite(lambda d: _vector_spec(d, (("H",), ("B", "H")), False))())),
            sinks=draw(st.one_of(st.none(), st.composite(lambda d: _vector_spec(d, (("H",),)))())),
            backward=not nan_q and draw(st.sampled_from((True, True, False))),
            grad_out=draw(layouts(4, (0, 1, 2, 3))), grad_lse=draw(st.one_of(st.none(), layouts(3, (0, 1, 2)))),
            nan_q=nan_q, seed=draw(st.integers(0, 2**16)))

    return build()


def varlen_specs(backend: str = "torch"):
    from hypothesis import strategies as st

    size = _sizes(backend)
    dtypes = KERNEL_DTYPES + (("float64",) if backend == "torch" else ())

    @st.composite
    def build(draw):
        batch = draw(st.integers(1, size["sequences"]))
        lengths = st.lists(st.integers(0, size["seq_length"]), min_size=batch, max_size=batch).map(tuple)
        heads_kv = draw(st.integers(1, 2))
        return VarlenSpec(
            dtype=draw(st.sampled_from(dtypes)), lengths_q=draw(lengths), lengths_k=draw(lengths),
            heads_q=heads_kv * draw(st.integers(1, size["group"])), heads_kv=heads_kv,
            dim=draw(st.integers(1, size["dim"])), dim_v=draw(st.integers(1, size["dim"])), **_options(draw),
            extra_max=draw(st.sampled_from((0, 0, 3))),
            q=draw(layouts(3, (0, 1))), k=draw(layouts(3, (0, 1))), v=draw(layouts(3, (0, 1))),
            cu_q=IndexSpec(draw(st.sampled_from(INT_NAMES)), draw(layouts(1))),
            cu_k=IndexSpec(draw(st.sampled_from(INT_NAMES)), draw(layouts(1))),
            alibi=draw(st.one_of(st.none(), st.composite(lambda d: _vector_spec(d, (("H",), ("B", "H")), False))())),
            sinks=draw(st.one_of(st.none(), st.composite(lambda d: _vector_spec(d, (("H",),)))())),
            backward=draw(st.sampled_from((True, True, False))),
            grad_out=draw(layouts(3, (0, 1, 2))), grad_lse=draw(st.one_of(st.none(), layouts(2, (0, 1)))),
            seed=draw(st.integers(0, 2**16)))

    return build()


def kvcache_specs(backend: str = "torch"):
    from hypothesis import strategies as st

    size = _sizes(backend)

    @st.composite
    def build(draw):
        batch = draw(st.integers(1, size["batch"]))
        seqlens = draw(st.sampled_from(("tensor", "tensor", "int", "none")))
        new = 0 if seqlens == "none" else draw(st.integers(0, 3))
        capacity = draw(st.integers(max(1, new), size["length"]))
        lengths = tuple(draw(st.lists(st.integers(0, capacity - new), min_size=batch, max_size=batch)))
        use_idx = draw(st.booleans())
        cache_rows = batch + (draw(st.integers(0, 2)) if use_idx else 0)
        rows = tuple(draw(st.permutations(range(cache_rows)))[:batch]) if use_idx else None
        heads_kv = draw(st.integers(1, 2))
        cache_expand = (0, 2) if new == 0 else ()
        return KVCacheSpec(
            dtype=draw(st.sampled_from(KERNEL_DTYPES)), lq=draw(st.integers(1, 4)), new=new,
            heads_q=heads_kv * draw(st.integers(1, size["group"])), heads_kv=heads_kv,
            dim=draw(st.integers(1, size["dim"])), dim_v=draw(st.integers(1, size["dim"])), capacity=capacity,
            lengths=lengths, cache_rows=cache_rows, **_options(draw), num_splits=draw(st.sampled_from((0, 0, 1, 2, 5))),
            q=draw(layouts(4, (0, 2))), k_cache=draw(layouts(4, cache_expand)), v_cache=draw(layouts(4, cache_expand)),
            k_new=draw(layouts(4, (0, 1, 2))), v_new=draw(layouts(4, (0, 1, 2))), seqlens=seqlens,
            seqlens_index=IndexSpec(draw(st.sampled_from(INT_NAMES)), draw(layouts(1, (0,)))),
            batch_idx=rows, batch_idx_index=IndexSpec(draw(st.sampled_from(INT_NAMES)),
                                                      draw(layouts(1, (0,) if new == 0 else ()))),
            alibi=draw(st.one_of(st.none(), st.composite(lambda d: _vector_spec(d, (("H",), ("B", "H")), False))())),
            sinks=draw(st.one_of(st.none(), st.composite(lambda d: _vector_spec(d, (("H",),), False))())),
            nan_q=draw(_rarely()), seed=draw(st.integers(0, 2**16)))

    return build()


# ----------------------------------------------------------------------------------------------
# Exploring: run many examples and keep every failure (the tests stop at the first)

STRATEGIES = {"dense": dense_specs, "varlen": varlen_specs, "kvcache": kvcache_specs}


def explore(backend: str, kind: str, examples: int, seed: int | None = None) -> list[tuple]:
    """[(spec, failures)] over `examples` hypothesis examples of `kind`, run in a worker for `backend`."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fix_seed

    runner = IsolatedRunner(backend)
    found = []

    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=seed is None)
    @given(spec=STRATEGIES[kind](backend))
    def collect(spec):
        try:
            failures = runner.run(spec)
        except SpecNotApplicable:
            return
        if failures:
            found.append((spec, failures))

    if seed is not None:
        collect = fix_seed(seed)(collect)
    try:
        collect()
    finally:
        runner.close()
    return found


def main(argv: list[str] | None = None) -> int:
    """python -m mfa_hf.testing_layouts explore BACKEND KIND [EXAMPLES] [SEED]: print every failing example."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] != "explore":
        print(main.__doc__)
        return 2
    backend, kind = args[1], args[2]
    examples = int(args[3]) if len(args) > 3 else 100
    seed = int(args[4]) if len(args) > 4 else None
    found = explore(backend, kind, examples, seed)
    for spec, failures in found:
        print(f"{backend}: {describe(spec)}")
        for failure in failures:
            print(f"  - {failure}")
    print(f"{len(found)} of {examples} examples failed")
    return 1 if found else 0


if __name__ == "__main__":
    # Through the package's module, so that the specs pickle as mfa_hf.testing_layouts.* (not __main__.*)
    from mfa_hf.testing_layouts import main as package_main

    raise SystemExit(package_main())
