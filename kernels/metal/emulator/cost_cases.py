"""Our kernels and MLX's on the same work, run as counted builds: the launches behind one call.

- forward: our prefill forward (kernels/metal/forward.py) against MLX's steel attention with the
  block sizes MLX's host picks (mlx_launch.SteelBlocks.mlx_default);
- decode: our decode (kernels/metal/decode.py, split policy included) against MLX's 2-pass
  `sdpa_vector` with `blocks` = 64 (MLX's choice on 'g' and 's' devices at these shapes);
- backward: ours only (kernels/metal/backward.py: preprocess, dQ, dK/dV); MLX has no attention
  backward kernel. Its gradients are checked against float64 autograd before the counters are used.

Both sides get the same inputs (B = 1, not causal, no mask); each output is checked against a
float64 reference before its counters are used, so a wrong result can never produce a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ...contract import AttentionCall, CacheSide, DecodeCall, Gradients, Options
from ..backward import backward as our_backward
from ..decode import decode as our_decode
from ..forward import forward as our_forward
from .cost_counters import LaunchCounters, record_costs
from .library import compile_shader
from .mlx_launch import SteelBlocks, sdpa_vector_2pass, sdpa_vector_2pass_source, steel_attention_launch, \
    steel_attention_source

MLX_DECODE_BLOCKS = 64
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4}


@dataclass(frozen=True)
class Shape:
    kind: str  # "forward", "decode" or "backward"
    head_dim: int
    keys: int  # key (cache) length; the forward's query length too
    heads_q: int
    heads_kv: int
    queries: int
    dtype: torch.dtype = torch.float16

    @property
    def label(self) -> str:
        return f"D={self.head_dim} L={self.keys}"

    @property
    def kv_bytes(self) -> int:
        """The K and V elements of the launch's keys, each read once."""
        return 2 * self.keys * self.heads_kv * self.head_dim * torch.finfo(self.dtype).bits // 8


def forward_shape(head_dim: int, length: int, heads: int = 1) -> Shape:
    return Shape("forward", head_dim, length, heads, heads, length)


def backward_shape(head_dim: int, length: int, heads: int = 1) -> Shape:
    return Shape("backward", head_dim, length, heads, heads, length)


def decode_shape(head_dim: int, cache_length: int, heads_q: int = 8, heads_kv: int = 2) -> Shape:
    return Shape("decode", head_dim, cache_length, heads_q, heads_kv, 1)


def _inputs(shape: Shape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (1, Lq, Hq, D), k and v (1, L, Hkv, D)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, shape.queries, shape.heads_q, shape.head_dim, generator=g).to(shape.dtype)
    k, v = (torch.randn(1, shape.keys, shape.heads_kv, shape.head_dim, generator=g).to(shape.dtype) for _ in range(2))
    return q, k, v


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in float64, (B, L, H, D) layout, GQA by index."""
    group = q.shape[2] // k.shape[2]
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


def _check(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, who: str) -> float:
    error = (out.double() - _reference(q, k, v)).abs().max().item()
    if not error <= TOLERANCE[q.dtype]:
        raise AssertionError(f"{who}: max error {error} against float64 (> {TOLERANCE[q.dtype]}): counters not used")
    return error


def ours(shape: Shape, seed: int = 0) -> list[LaunchCounters]:
    """The launches of our kernel on `shape` (forward or decode)."""
    q, k, v = _inputs(shape, seed)
    options = Options(scale=1 / math.sqrt(shape.head_dim))
    with record_costs() as launches:
        if shape.kind == "forward":
            out, _ = our_forward(AttentionCall(q, k, v, options))
        else:
            seqlens = torch.tensor([shape.keys], dtype=torch.int32)
            side = lambda t: CacheSide(t, None, "none", shape.head_dim)  # noqa: E731
            out, _ = our_decode(DecodeCall(q, side(k), side(v), seqlens, options))
    _check(out, q, k, v, f"our {shape.kind} {shape.label}")
    return list(launches)


def mlx(shape: Shape, kernels_dir: Path, seed: int = 0) -> list[LaunchCounters]:
    """The launches of MLX's kernel on `shape`: steel attention (forward) or the 2-pass sdpa_vector (decode)."""
    q, k, v = _inputs(shape, seed)
    qm, km, vm = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # MLX's (B, H, L, D)
    scale = 1 / math.sqrt(shape.head_dim)
    with record_costs() as launches:
        if shape.kind == "forward":
            blocks = SteelBlocks.mlx_default(shape.head_dim)
            source, name = steel_attention_source(kernels_dir, shape.dtype, shape.head_dim, blocks,
                                                  shape.queries % blocks.bq == 0, shape.keys % blocks.bk == 0,
                                                  causal=False)
            out = torch.full_like(qm, float("nan"))
            args, launch = steel_attention_launch(qm, km, vm, out, scale, blocks)
            getattr(compile_shader(source), name)(*args, **launch)
        else:
            source, first, second = sdpa_vector_2pass_source(kernels_dir, shape.dtype, shape.head_dim,
                                                             MLX_DECODE_BLOCKS)
            out = sdpa_vector_2pass(compile_shader(source), first, second, qm, km, vm, scale, MLX_DECODE_BLOCKS)
    _check(out.transpose(1, 2), q, k, v, f"MLX {shape.kind} {shape.label}")
    return list(launches)


BACKWARD_TOLERANCE = {torch.float16: 5e-2, torch.bfloat16: 2e-1, torch.float32: 1e-3}


def ours_backward(shape: Shape, seed: int = 0) -> list[LaunchCounters]:
    """The launches of our backward (preprocess, dQ, dK/dV) on `shape` (B = 1, not causal, no mask),
    after the forward that gives it out and LSE (not counted). dq, dk, dv are checked against float64
    autograd (relative to each gradient's largest element) before the counters are returned."""
    q, k, v = _inputs(shape, seed)
    grad_out = torch.randn(q.shape[:3] + (shape.head_dim,), generator=torch.Generator().manual_seed(seed + 1))
    grad_out = grad_out.to(shape.dtype)
    call = AttentionCall(q, k, v, Options(scale=1 / math.sqrt(shape.head_dim)))
    out, lse = our_forward(call)
    with record_costs() as launches:
        dq, dk, dv, _, _ = our_backward(call, Gradients(grad_out, None, out, lse))
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    want = torch.autograd.grad(_reference(*leaves), leaves, grad_out.double())
    for name, got, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        error = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        if not error <= BACKWARD_TOLERANCE[shape.dtype]:
            raise AssertionError(f"our backward {shape.label}: {name} relative error {error} against float64 "
                                 f"(> {BACKWARD_TOLERANCE[shape.dtype]}): counters not used")
    return list(launches)
