"""The autograd boundary of ring attention: natural-order shards in and out, the ring in between.

The caller's rank r holds tokens [r*n, (r+1)*n). When zig-zag balances the work (ring_plan.py), q, k
and v move to the zig-zag layout on the way in; out and lse (and, in backward, the gradients) move
back, so the caller never sees it. The relayed tensors are what backward saves: O(n) per rank.
"""

from __future__ import annotations

import torch

from .comm import Group
from .layout import natural, redistribute
from .local import BlockOptions, sinks_grad
from .ring import ring_backward, ring_forward
from .ring_plan import RingPlan

Q_TAG, K_TAG, V_TAG = 1000, 3000, 5000  # chunk tags of the relayouts (2P chunks each)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, group: Group, plan: RingPlan, options: BlockOptions):
        ctx.set_materialize_grads(False)
        q_in, k_in, v_in = (_to_plan(group, plan, t, 1, kv, tag) for t, kv, tag in
                            ((q, False, Q_TAG), (k, True, K_TAG), (v, True, V_TAG)))
        needs_grad = any(ctx.needs_input_grad[:4])
        out, lse = ring_forward(group, plan, q_in, k_in, v_in, options, sinks, needs_grad)
        ctx.save_for_backward(q_in, k_in, v_in, out, lse, sinks)
        ctx.group, ctx.plan, ctx.options = group, plan, options
        return _from_plan(group, plan, out, 1, False, Q_TAG), _from_plan(group, plan, lse, 2, False, Q_TAG)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        group, plan = ctx.group, ctx.plan
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_out = _to_plan(group, plan, grad_out, 1, False, Q_TAG)
        if grad_lse is not None:
            grad_lse = _to_plan(group, plan, grad_lse, 2, False, Q_TAG)
        dq, dk, dv = ring_backward(group, plan, grad_out, grad_lse, out, lse, q, k, v, ctx.options)
        dsinks = sinks_grad(sinks, grad_out, grad_lse, out, lse) if ctx.needs_input_grad[3] else None
        dq = _from_plan(group, plan, dq, 1, False, Q_TAG)
        dk = _from_plan(group, plan, dk, 1, True, K_TAG)
        dv = _from_plan(group, plan, dv, 1, True, V_TAG)
        return dq, dk, dv, dsinks, None, None, None


def _layouts(plan: RingPlan, t: torch.Tensor, dim: int, kv: bool):
    layout = plan.k_layout if kv else plan.q_layout
    return natural(plan.size, t.shape[dim], pieces=2), layout


def _to_plan(group: Group, plan: RingPlan, t, dim: int, kv: bool, tag: int):
    if not plan.balanced:
        return t
    source, target = _layouts(plan, t, dim, kv)
    return redistribute(group, t, dim, source, target, tag)


def _from_plan(group: Group, plan: RingPlan, t, dim: int, kv: bool, tag: int):
    if not plan.balanced:
        return t
    target, source = _layouts(plan, t, dim, kv)
    return redistribute(group, t, dim, source, target, tag)
