"""Test cases for the varlen context-parallel functions: the whole packed problem is drawn in the parent,
every rank runs its contiguous shard of the stream with the global cu_seqlens, and the assembled output
and gradients are held to DESIGN.md's rule against the float64 varlen reference of the whole stream (as
tests/test_api.py holds the single-process mfa_hf.flash_attn_varlen_func).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.reference import attention_reference_varlen
from ..testing import FORWARD_FACTOR, GRADIENT_FACTOR, assert_close_to_reference, delta_rounding_effect
from .testing import Context
from .testing_attention import GRAD_NAMES, attend_shards


@dataclass(frozen=True)
class VarlenCase:
    """Packed sequences of lengths lens_q / lens_k (the whole stream) split over `ranks` ranks."""

    method: str
    ranks: int
    lens_q: tuple[int, ...]
    lens_k: tuple[int, ...]
    heads_q: int = 4
    heads_kv: int = 2
    dim: int = 16
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    sinks: bool = False
    dtype: torch.dtype = torch.float32

    @property
    def id(self) -> str:
        mode = ("causal" if self.causal else "full") + ("" if self.window == (-1, -1) else f"-w{self.window}")
        extras = ("-sinks" if self.sinks else "") + (f"-cap{self.softcap:g}" if self.softcap else "")
        lens = "x".join(map(str, self.lens_q)) + ("" if self.lens_q == self.lens_k else
                                                  "_k" + "x".join(map(str, self.lens_k)))
        return (f"{self.method}{self.ranks}-varlen{lens}-{mode}-h{self.heads_q}.{self.heads_kv}{extras}-"
                f"{str(self.dtype).removeprefix('torch.')}")

    def offsets(self, lens: tuple[int, ...]) -> torch.Tensor:
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def varlen_case(method: str, ranks: int, lens_q, lens_k=None, **fields) -> VarlenCase:
    return VarlenCase(method, ranks, tuple(lens_q), tuple(lens_q if lens_k is None else lens_k), **fields)


def draw_varlen(c: VarlenCase, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(c.lens_q), sum(c.lens_k)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(c.dtype)

    return {"q": randn(tq, c.heads_q, c.dim), "k": randn(tk, c.heads_kv, c.dim), "v": randn(tk, c.heads_kv, c.dim),
            "sinks": torch.randn(c.heads_q, generator=g) if c.sinks else None,
            "grad_out": randn(tq, c.heads_q, c.dim), "grad_lse": torch.randn(c.heads_q, tq, generator=g),
            "cu_seqlens_q": c.offsets(c.lens_q), "cu_seqlens_k": c.offsets(c.lens_k)}


def run_varlen_shard(context: Context, payload: tuple) -> dict | None:
    """Worker task: this rank's shard of the stream through the varlen method; its outputs and gradients."""
    from . import ring_flash_attn_varlen_func, ulysses_flash_attn_varlen_func

    c, tensors = payload
    group = context.group_of(c.ranks)
    if group is None:
        return None
    function = ring_flash_attn_varlen_func if c.method == "ring" else ulysses_flash_attn_varlen_func

    def call(q, k, v, sinks):
        return function(q, k, v, tensors["cu_seqlens_q"], tensors["cu_seqlens_k"], max(c.lens_q), max(c.lens_k),
                        group=group, causal=c.causal, window_size=c.window, softcap=c.softcap, sinks=sinks,
                        return_lse=True)

    return attend_shards(context.rank, c.ranks, tensors, 0, True, call)


def check_varlen(c: VarlenCase, inputs: dict, whole: dict) -> None:
    """Hold the assembled result to the tolerance rule against the float64 reference of the whole stream."""
    names = [n for n in GRAD_NAMES if inputs[n] is not None]
    leaves64 = [inputs[n].detach().double().requires_grad_() for n in names]
    leaves = [inputs[n].detach().clone().requires_grad_() for n in names]
    cu = (inputs["cu_seqlens_q"], inputs["cu_seqlens_k"])
    options = dict(causal=c.causal, window_size=c.window, softcap=c.softcap)

    def reference(tensors, upcast):
        sinks = tensors[3] if c.sinks else None
        return attention_reference_varlen(*tensors[:3], *cu, sinks=sinks, upcast=upcast, **options)

    ref, ref_lse = reference(leaves64, True)
    base, base_lse = reference(leaves, False)
    assert_close_to_reference(whole["out"], ref, base, FORWARD_FACTOR, "out")
    assert_close_to_reference(whole["lse"], ref_lse, base_lse, FORWARD_FACTOR, "lse", torch.float32)
    grad_out, grad_lse = inputs["grad_out"], inputs["grad_lse"]
    want = torch.autograd.grad((ref, ref_lse), leaves64, (grad_out.double(), grad_lse.double()), retain_graph=True)
    baseline = torch.autograd.grad((base, base_lse), leaves, (grad_out, grad_lse.to(base_lse.dtype)))
    effects = delta_rounding_effect(whole["out"], ref, ref_lse, leaves64, grad_out)
    for name, expected, base_grad, extra in zip(names, want, baseline, effects):
        assert_close_to_reference(whole[name], expected, base_grad, GRADIENT_FACTOR, f"d{name}", c.dtype, extra)
