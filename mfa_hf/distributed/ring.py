"""Ring attention: each rank keeps its queries and passes K/V around the ring, one hop per step.

Forward: at every step each rank attends its queries to the K/V block it holds (only the pieces the
window lets it see, ring_plan.py), merges the partial result into its running (out, lse) exactly
through the log-sum-exps (kernels/merge.merge_partials, the merge the two-part KV cache uses), and
the next block's transfer runs while it computes. Sinks join once, after the last step.

Backward (FlashAttention-2 style): the same ring again; each step's block gradients are recomputed
from the row's final out and LSE (local.block_backward), dq accumulates where it is, dk/dv travel with
their K/V block and go home at the end. Accumulation is float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from ..kernels.launch import lse_dtype
from ..kernels.merge import merge_partials
from .comm import Group, ring_shift
from .local import BlockOptions, block_backward, block_forward
from .ring_plan import RingPlan

KV_TAG, GRAD_TAG, HOME_TAG = 0, 2, 4


def ring_forward(group: Group, plan: RingPlan, q, k, v, options: BlockOptions, sinks, needs_grad: bool):
    """(out in q's dtype, lse) of this rank's queries (plan layout) against every rank's keys."""
    batch, rows, heads, _ = q.shape
    acc = lse_dtype(q.dtype)
    out = torch.zeros((batch, rows, heads, v.shape[-1]), dtype=acc, device=q.device)
    lse = torch.full((batch, heads, rows), -torch.inf, dtype=acc, device=q.device)
    keys, values = k, v
    for step in range(plan.last_step + 1):
        transfer = ring_shift(group, [keys, values], tag=KV_TAG) if step < plan.last_step else None
        for piece in plan.pieces(group.rank, step):
            part = block_forward(q[:, piece.rows], keys[:, piece.keys], values[:, piece.keys],
                                 BlockOptions(options.scale, piece.window, options.softcap), needs_grad)
            merged = merge_partials([(out[:, piece.rows], lse[:, :, piece.rows]),
                                     (part[0].to(acc), part[1].to(acc))], None)
            out[:, piece.rows], lse[:, :, piece.rows] = merged
        if transfer is not None:
            keys, values = transfer.wait()
    if sinks is not None:
        out, lse = merge_partials([(out, lse)], sinks)
    return out.to(q.dtype), lse


def ring_backward(group: Group, plan: RingPlan, grad_out, grad_lse, out, lse, q, k, v, options: BlockOptions):
    """(dq, dk, dv) of this rank's q, k, v (plan layout)."""
    acc = lse_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    keys, values = k, v
    dk = dv = grads_in = None
    for step in range(plan.last_step + 1):
        kv_transfer = ring_shift(group, [keys, values], tag=KV_TAG) if step < plan.last_step else None
        dk_step = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv_step = torch.zeros(v.shape, dtype=acc, device=q.device)
        for piece in plan.pieces(group.rank, step):
            rows = piece.rows
            dq_b, dk_b, dv_b = block_backward(
                grad_out[:, rows], None if grad_lse is None else grad_lse[:, :, rows], out[:, rows], lse[:, :, rows],
                q[:, rows], keys[:, piece.keys], values[:, piece.keys],
                BlockOptions(options.scale, piece.window, options.softcap))
            dq[:, rows] += dq_b
            dk_step[:, piece.keys] += dk_b
            dv_step[:, piece.keys] += dv_b
        if grads_in is not None:  # what the ranks before us accumulated for this block
            dk, dv = grads_in.wait()
            dk_step += dk
            dv_step += dv
        dk, dv = dk_step, dv_step
        grads_in = ring_shift(group, [dk, dv], tag=GRAD_TAG) if step < plan.last_step else None
        if kv_transfer is not None:
            keys, values = kv_transfer.wait()
    if plan.last_step:  # we hold the block of rank (r - last_step): send it home, receive ours
        dk, dv = ring_shift(group, [dk, dv], hops=-plan.last_step, tag=HOME_TAG).wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
