"""One block of attention on this rank, through the project's backends: forward with its LSE, and the
backward of a block given the *whole* row's output and LSE.

This is the piece ring attention (ring.py) and the Diffusers context-parallel ops share. The forward
returns the block's (out, lse); the backward recomputes the block's probabilities from the global LSE
(FlashAttention-2's backward does exactly that), so the block gradients of every ring step add up to
the gradients of the whole row. Both pick the backend the way flash_attn_func does (dispatch.select:
MFA_BACKEND, supports()) and call its registered ops, so a trace names the backend that served.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import dispatch
from ..api import validated_call
from ..ops import describe


@dataclass(frozen=True)
class BlockOptions:
    """What a block call needs besides its tensors: the scale, the window (causal folded in), softcap."""

    scale: float
    window: tuple[int, int]
    softcap: float = 0.0


def _call(q, k, v, options: BlockOptions, needs_grad: bool):
    call = validated_call(q, k, v, softmax_scale=options.scale, window_size=options.window, softcap=options.softcap)
    problem = describe(call, needs_grad=needs_grad)
    return call, problem, dispatch.select(problem)


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: BlockOptions,
                  needs_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Lq, Hq, Dv), lse (B, Hq, Lq) float32) of q against this block of keys; no autograd."""
    call, problem, chosen = _call(q, k, v, options, needs_grad)
    with torch.no_grad():
        return chosen.ops.forward(call, problem)


def block_backward(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
                   q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   options: BlockOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of this block's share, given the row's whole out (B, Lq, Hq, Dv) and lse (B, Hq, Lq)
    (the sinks already in it) and their gradients."""
    call, _, chosen = _call(q, k, v, options, needs_grad=True)
    grad_lse = None if grad_lse is None else grad_lse.contiguous()
    dq, dk, dv, _, _ = chosen.ops.backward(grad_out.contiguous(), grad_lse, out.contiguous(), lse.contiguous(), False,
                                           *call.op_args())
    return dq, dk, dv


def sinks_grad(sinks: torch.Tensor, grad_out: torch.Tensor, grad_lse: torch.Tensor | None, out: torch.Tensor,
               lse: torch.Tensor) -> torch.Tensor:
    """d loss / d sinks for these rows: each row's sink probability exp(sink - lse) times
    -(rowsum(dO * O) - dLSE), summed over batch and rows (the sink adds nothing to the output)."""
    acc = torch.float64 if lse.dtype == torch.float64 else torch.float32
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)  # (B, Hq, Lq)
    if grad_lse is not None:
        delta = delta - grad_lse.to(acc)
    sink_prob = torch.exp(sinks.to(acc)[None, :, None] - lse.to(acc))
    return -(sink_prob * delta).sum(dim=(0, 2)).to(sinks.dtype)
