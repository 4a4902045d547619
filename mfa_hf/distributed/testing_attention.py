"""Test cases for the context-parallel functions: the whole problem is drawn in the parent, every rank
runs its natural-order shard, and the assembled output and gradients are held to DESIGN.md's rule
against the float64 reference of the whole problem (mfa_hf.testing: 2x PyTorch's own error in the
input dtype for outputs, 3x plus FlashAttention's by-design backward effect for gradients).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..testing import (
    FORWARD_FACTOR,
    GRADIENT_FACTOR,
    Case,
    assert_close_to_reference,
    delta_rounding_effect,
    make_inputs,
    reference_of,
)
from .testing import Context

GRAD_NAMES = ("q", "k", "v", "sinks")


@dataclass(frozen=True)
class CPCase:
    """An attention Case split over `ranks` ranks by `method` ("ring" or "ulysses"); lq/lk are global."""

    method: str
    ranks: int
    case: Case
    backward: bool = True
    return_lse: bool = True

    @property
    def id(self) -> str:
        return f"{self.method}{self.ranks}-{self.case.id}" + ("" if self.backward else "-fwd")


def cp_case(method: str, ranks: int, **fields) -> CPCase:
    backward = fields.pop("backward", True)
    return CPCase(method, ranks, replace(Case(batch=1, lq=16, lk=16, heads_q=4, heads_kv=2, dim=16, dim_v=16),
                                         **fields), backward)


def draw(cp: CPCase, seed: int) -> dict:
    """Fresh inputs for the whole problem, and the output / LSE gradients the ranks back-propagate."""
    inputs = make_inputs(cp.case, seed=seed, requires_grad=cp.backward)
    g = torch.Generator().manual_seed(seed + 7)
    c = cp.case
    inputs["grad_out"] = torch.randn(c.batch, c.lq, c.heads_q, c.dim_v, generator=g).to(c.dtype)
    inputs["grad_lse"] = torch.randn(c.batch, c.heads_q, c.lq, generator=g)
    return inputs


def run_shard(context: Context, payload: tuple) -> dict | None:
    """Worker task: this rank's shard through the method; its outputs and gradients (shards)."""
    from . import ring_flash_attn_func, ulysses_flash_attn_func

    cp, tensors = payload
    group = context.group_of(cp.ranks)
    if group is None:
        return None
    c = cp.case
    function = ring_flash_attn_func if cp.method == "ring" else ulysses_flash_attn_func

    def call(q, k, v, sinks):
        return function(q, k, v, group=group, causal=c.causal, window_size=c.window, softcap=c.softcap, sinks=sinks,
                        return_lse=True)

    return attend_shards(context.rank, cp.ranks, tensors, 1, cp.backward, call)


def attend_shards(rank: int, ranks: int, tensors: dict, seq_dim: int, backward: bool, call) -> dict:
    """This rank's natural-order shard (along seq_dim; the LSE's is seq_dim + 1) of the whole inputs
    through call(q, k, v, sinks) -> (out, lse); its outputs and, with backward, its gradients."""
    mine = {name: tensors[name].detach().chunk(ranks, dim=seq_dim)[rank].clone() for name in ("q", "k", "v", "grad_out")}
    grad_lse = tensors["grad_lse"].chunk(ranks, dim=seq_dim + 1)[rank].clone()
    sinks = None if tensors["sinks"] is None else tensors["sinks"].detach().clone()
    leaves = [mine["q"], mine["k"], mine["v"], sinks]
    for leaf in leaves:
        if leaf is not None:
            leaf.requires_grad_(backward)
    out, lse = call(mine["q"], mine["k"], mine["v"], sinks)
    result = {"out": out.detach(), "lse": lse.detach()}
    if backward:
        used = [leaf for leaf in leaves if leaf is not None]
        grads = torch.autograd.grad((out, lse), used, (mine["grad_out"], grad_lse))
        result.update(zip(GRAD_NAMES, grads))
    return result


def assemble(results: list, ranks: int, seq_dim: int = 1) -> dict:
    """Concatenate the ranks' shards along the sequence; sum the sinks' per-rank shares."""
    shards = results[:ranks]
    whole = {"out": torch.cat([s["out"] for s in shards], seq_dim),
             "lse": torch.cat([s["lse"] for s in shards], seq_dim + 1)}
    for name in ("q", "k", "v"):
        if name in shards[0]:
            whole[name] = torch.cat([s[name] for s in shards], seq_dim)
    if "sinks" in shards[0]:
        whole["sinks"] = sum(s["sinks"] for s in shards)
    return whole


def check(cp: CPCase, inputs: dict, whole: dict) -> None:
    """Hold the assembled result to the tolerance rule against the float64 reference of the whole problem."""
    ref, ref_lse, args64 = reference_of(cp.case, inputs, upcast=True)
    base, base_lse, args = reference_of(cp.case, inputs, upcast=False)
    assert_close_to_reference(whole["out"], ref, base, FORWARD_FACTOR, "out")
    assert_close_to_reference(whole["lse"], ref_lse, base_lse, FORWARD_FACTOR, "lse", torch.float32)
    if not cp.backward:
        return
    names = [n for n in GRAD_NAMES if args64[n] is not None]
    grad_out, grad_lse = inputs["grad_out"], inputs["grad_lse"]
    want = torch.autograd.grad((ref, ref_lse), [args64[n] for n in names],
                               (grad_out.double(), grad_lse.double()), retain_graph=True)
    baseline = torch.autograd.grad((base, base_lse), [args[n] for n in names], (grad_out, grad_lse.to(base_lse.dtype)))
    effects = delta_rounding_effect(whole["out"], ref, ref_lse, [args64[n] for n in names], grad_out, names, cp.case,
                                    args64)
    for name, expected, base_grad, extra in zip(names, want, baseline, effects):
        assert_close_to_reference(whole[name], expected, base_grad, GRADIENT_FACTOR, f"d{name}", cp.case.dtype, extra)


BAD_CALLS = ("shard_lengths_differ", "options_differ", "heads_not_divisible", "bad_window_on_one_rank",
             "not_a_member")


def bad_call(context: Context, payload: tuple):
    """Worker task: one kind of mistake (BAD_CALLS) over the first `ranks` ranks; what each rank raised."""
    from . import ring_flash_attn_func, ulysses_flash_attn_func

    ranks, kind = payload
    r = context.rank
    if kind == "not_a_member":  # a rank outside the group calls with it; the members do not call
        if r != ranks:
            return None
        group = context.groups[ranks]
    else:
        group = context.group_of(ranks)
        if group is None:
            return None
    q, k, v = (torch.randn(1, 8, 4, 16) for _ in range(3))
    function, options = ring_flash_attn_func, {}
    if kind == "shard_lengths_differ" and r == 1:
        q, k, v = (torch.randn(1, 7, 4, 16) for _ in range(3))
    elif kind == "options_differ":
        options["causal"] = r == 1
    elif kind == "heads_not_divisible":
        function = ulysses_flash_attn_func
        q, k, v = (torch.randn(1, 8, 3, 16) for _ in range(3))
    elif kind == "bad_window_on_one_rank" and r == 1:
        options["window_size"] = (-2, 0)
    function(q, k, v, group=group, **options)
    return "no error"
