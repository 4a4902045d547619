"""The backend contract: what a backend is handed, what it returns, and the protocol it implements.

Validation (mfa_hf.api, mfa_hf.kvcache) builds these frozen call objects once per call; the custom-op
boundary (mfa_hf.ops) flattens them into the op schema and rebuilds them inside the op; a backend
reads them. A backend folder (kernels/<name>/) exposes one object implementing `Backend`, and one line
of mfa_hf/dispatch.py's REGISTRY names it. This module imports only torch: every folder may import it.

Conventions every backend follows (kernels/reference.py is the semantics of record):
- dense q (B, Lq, Hq, Dqk), k (B, Lk, Hkv, Dqk), v (B, Lk, Hkv, Dv) -> out (B, Lq, Hq, Dv), lse
  (B, Hq, Lq); packed (cu_seqlens given) q (Tq, Hq, D) ... -> out (Tq, Hq, Dv), lse (Hq, Tq).
- The window is the only visibility rule: key j is visible from query i when
  i + (Lk - Lq) - left <= j <= i + (Lk - Lq) + right, with -1 meaning unbounded on that side.
  Causal is folded into it (right = 0) by validation, so no backend re-derives it.
- Helper tensors come normalised (mfa_hf/helper_tensors.py): int32 contiguous index vectors,
  float32 (float64 for float64 inputs) contiguous slopes and sinks, 4-D masks that keep their view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

NO_WINDOW = (-1, -1)


def fold_causal(causal: bool, window: tuple[int, int]) -> tuple[int, int]:
    """(left, right) with causal folded in: causal bounds the right side at the diagonal."""
    left, right = window
    return (left, 0) if causal else (left, right)


# Head dims the compiled kernels (metal, triton) are built for; larger ones (Gemma 4's 512-wide global layers)
# are served by the torch backend, which takes any head dim.
KERNEL_MAX_HEAD_DIM = 256


def head_dims_beyond(head_dim_qk: int, head_dim_v: int, kernels: str) -> str:
    """Why `kernels` cannot serve these head dims, or "" when they can."""
    if max(head_dim_qk, head_dim_v) <= KERNEL_MAX_HEAD_DIM:
        return ""
    return (f"head dims ({head_dim_qk}, {head_dim_v}): the {kernels} kernels go up to {KERNEL_MAX_HEAD_DIM} "
            "(the torch backend serves larger ones)")


@dataclass(frozen=True)
class Options:
    """The scalar options of an attention call, validated."""

    scale: float
    window_left: int = -1
    window_right: int = -1  # 0: causal (validation folds causal here)
    softcap: float = 0.0
    dropout_p: float = 0.0
    max_seqlen_q: int = 0  # packed sequences only: the longest query / key sequence (grid sizes)
    max_seqlen_k: int = 0
    bf16_backward: bool = False  # the backward's matmul operands in bfloat16, products summed in float32

    @property
    def causal(self) -> bool:
        """Whether no key right of the diagonal is visible (block tables prune with it)."""
        return self.window_right == 0

    @property
    def window(self) -> tuple[int, int]:
        return self.window_left, self.window_right



@dataclass(frozen=True)
class AttentionCall:
    """One validated attention call: the tensors, and the frozen options."""

    q: Tensor
    k: Tensor
    v: Tensor
    options: Options
    attn_mask: Optional[Tensor] = None  # bool (True = attend) or additive float, 4-D, broadcastable
    alibi_slopes: Optional[Tensor] = None  # (Hq,) or (B, Hq)
    sinks: Optional[Tensor] = None  # (Hq,) logits joining each row's softmax denominator
    cu_seqlens_q: Optional[Tensor] = None  # (B + 1,) int32 offsets: packed sequences
    cu_seqlens_k: Optional[Tensor] = None
    dropout_seed: Optional[Tensor] = None  # 0-d int64 (dropout_p > 0 only)

    TENSOR_NAMES = ("q", "k", "v", "attn_mask", "alibi_slopes", "sinks", "cu_seqlens_q", "cu_seqlens_k",
                    "dropout_seed")

    def op_args(self) -> tuple:
        """The flat argument list of the custom op's schema: the tensors, then the options."""
        o = self.options
        return (self.q, self.k, self.v, self.attn_mask, self.alibi_slopes, self.sinks, self.cu_seqlens_q,
                self.cu_seqlens_k, self.dropout_seed, o.scale, o.window_left, o.window_right, o.softcap,
                o.dropout_p, o.max_seqlen_q, o.max_seqlen_k, o.bf16_backward)

    @classmethod
    def from_op_args(cls, args) -> "AttentionCall":
        q, k, v, attn_mask, alibi_slopes, sinks, cu_q, cu_k, seed = args[:9]
        return cls(q, k, v, Options(*args[9:17]), attn_mask, alibi_slopes, sinks, cu_q, cu_k, seed)

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.numel() - 1 if self.varlen else self.q.shape[0]

    @property
    def seqlen_q(self) -> int:
        """Lq as the grid sees it (the longest sequence when packed)."""
        return self.options.max_seqlen_q if self.varlen else self.q.shape[1]

    @property
    def seqlen_k(self) -> int:
        return self.options.max_seqlen_k if self.varlen else self.k.shape[1]

    @property
    def heads_q(self) -> int:
        return self.q.shape[-2]

    @property
    def heads_kv(self) -> int:
        return self.k.shape[-2]

    @property
    def mask_kind(self) -> str:
        """"none", "bool" or "additive"."""
        if self.attn_mask is None:
            return "none"
        return "bool" if self.attn_mask.dtype == torch.bool else "additive"

    @property
    def empty(self) -> bool:
        """No score to compute: a kernel grid would have an empty dimension."""
        return min(self.batch, self.seqlen_q, self.seqlen_k, self.heads_q) == 0


@dataclass(frozen=True)
class Gradients:
    """What a backward needs besides the forward's call."""

    grad_out: Tensor
    grad_lse: Optional[Tensor]
    out: Tensor
    lse: Tensor
    want_mask_grad: bool = False  # an additive mask's gradient is wanted


@dataclass(frozen=True)
class CacheSide:
    """K or V of a KV cache as a kernel reads it: the plain cache (format "none", scales None) or a
    QuantizedKV's codes with their float32 scales, broadcastable to (Bc, Smax, Hkv, D // group_size)."""

    codes: Tensor
    scales: Optional[Tensor]
    format: str
    group_size: int


@dataclass(frozen=True)
class DecodeCall:
    """Attention of q (B, Lq, Hq, D) over each row's valid cache prefix: seqlens_k (B,) int32 keys
    visible to row b (new tokens included), cache_batch_idx (B,) int32 or None mapping rows to cache
    rows. The window aligns bottom-right on seqlens_k[b]. num_splits 0 lets the backend choose.

    A cache in two parts (KIVI-style: quantized prefix, full-precision residual) adds residual_keys /
    residual_values (B_cache, r, Hkv, D), rows chosen like the prefix's, and residual_lengths (B,) int32
    (r for every row): row b's keys are then prefix[:seqlens_k[b]] followed by the r residual tokens, the
    window counts in all of them, and sinks join once. kernels/merge.py composes that from two plain
    decodes, so a backend's decode() only ever sees calls without a residual.
    """

    q: Tensor
    keys: CacheSide
    values: CacheSide
    seqlens_k: Tensor
    options: Options
    cache_batch_idx: Optional[Tensor] = None
    alibi_slopes: Optional[Tensor] = None
    sinks: Optional[Tensor] = None
    num_splits: int = 0
    residual_keys: Optional[Tensor] = None
    residual_values: Optional[Tensor] = None
    residual_lengths: Optional[Tensor] = None

    def op_args(self) -> tuple:
        k, v, o = self.keys, self.values, self.options
        return (self.q, k.codes, k.scales, v.codes, v.scales, self.seqlens_k, self.cache_batch_idx,
                self.alibi_slopes, self.sinks, k.format, v.format, k.group_size, v.group_size, o.scale,
                o.window_left, o.window_right, o.softcap, self.num_splits, self.residual_keys,
                self.residual_values, self.residual_lengths)

    @classmethod
    def from_op_args(cls, args) -> "DecodeCall":
        (q, k_codes, k_scales, v_codes, v_scales, seqlens_k, rows, slopes, sinks, k_format, v_format,
         k_group, v_group, scale, left, right, softcap, num_splits) = args[:18]
        residual = tuple(args[18:21]) + (None,) * (21 - max(18, len(args)))
        return cls(q, CacheSide(k_codes, k_scales, k_format, k_group), CacheSide(v_codes, v_scales, v_format, v_group),
                   seqlens_k, Options(scale, left, right, softcap), rows, slopes, sinks, num_splits, *residual)

    @property
    def has_residual(self) -> bool:
        return self.residual_keys is not None


@dataclass(frozen=True)
class AppendCall:
    """Write new (B, Lnew, Hkv, D) tokens at positions cache_seqlens[b] .. + Lnew - 1 of cache row
    cache_batch_idx[b] (or b), quantizing on write when the cache is quantized. Validated: an append
    cannot fail half-way. `cache.scales` is an empty tensor for a plain cache (never written)."""

    cache: CacheSide
    new: Tensor
    cache_seqlens: Tensor
    cache_batch_idx: Optional[Tensor] = None


@runtime_checkable
class Backend(Protocol):
    """What a backend folder provides (as one object, `BACKEND`, in its backend.py).

    name: the MFA_BACKEND name; device_types: the torch device types its custom ops are registered for
    (None: every device); fallback: the backend that serves a call whose kernel cannot be built or
    launched here (mfa_hf/kernel_fallback.py), or None. append: None when the backend has no append
    kernel of its own (the generic torch write is used). bf16_backward: whether backward() honours
    Options.bf16_backward (the custom-op layer refuses the option for a backend that does not).
    """

    name: str
    device_types: Optional[tuple[str, ...]]
    fallback: Optional[str]
    append: Optional[Callable[[AppendCall], None]]
    bf16_backward: bool

    def supports(self, problem) -> tuple[bool, str]:
        """(whether it serves this mfa_hf.problem.AttentionProblem, the reason either way)."""

    def forward(self, call: AttentionCall) -> tuple[Tensor, Tensor]:
        """(out, lse)."""

    def backward(self, call: AttentionCall, grads: Gradients):
        """(dq, dk, dv, dsinks or None, dmask or None)."""

    def decode(self, call: DecodeCall) -> tuple[Tensor, Tensor]:
        """(out (B, Lq, Hq, Dv), lse (B, Hq, Lq) float32)."""

    # Optional, as an attribute (None: absent): forward_replay(call) -> a function (q, k, v) -> (out, lse) or None,
    # relaunching what forward(call) just launched for later plain eager calls of exactly the same kind (the
    # caller guarantees the kind; the function returns None for a call it cannot replay). Host cost only.
    # decode_replay(call) -> a function (q, keys, values, lengths) -> (out, lse) or None, the same for decode().


@dataclass(frozen=True)
class BackendDefinition:
    """The usual way to implement `Backend`: functions gathered in a frozen record."""

    name: str
    supports: Callable
    forward: Callable
    backward: Callable
    decode: Callable
    append: Optional[Callable] = None
    device_types: Optional[tuple[str, ...]] = None
    fallback: Optional[str] = None
    bf16_backward: bool = False
    forward_replay: Optional[Callable] = None
    decode_replay: Optional[Callable] = None
