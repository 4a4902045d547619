"""The varlen (packed sequences) forms of the context-parallel functions, in FlashAttention's layout.

Every rank of `group` passes its contiguous shard of the packed token stream, natural order (rank r
holds tokens [r*T/P, (r+1)*T/P) of q (T, Hq, D), and likewise of k and v), and the cu_seqlens /
max_seqlen of the *whole* packing, exactly what flash_attn_varlen_func takes on one process. A sequence
may straddle ranks. This is the layout of ring-flash-attention's llama3_flash_attn_varlen_func; its
ring_flash_attn_varlen_func instead takes per-rank cu_seqlens of a stream where every sequence is split
across all ranks (docs/context_parallel.md, "Varlen").

Both reuse the dense machinery: the ring runs on the stream as one batch row, its plan cutting blocks
at sequence boundaries (ring_plan.py); Ulysses' all-to-all hands each rank the whole stream of its
heads, and one flash_attn_varlen_func call attends it.
"""

from __future__ import annotations

import torch

from ..api import flash_attn_varlen_func
from ..problem import NO_WINDOW
from .checks import validate
from .local import BlockOptions
from .packing import check_packing
from .ring_function import RingAttention
from .ring_plan import RingPlan
from .ulysses import check_heads, ulysses_attention

PACKING = "cu_seqlens_q/cu_seqlens_k"


def ring_flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, group=None,
                                causal: bool = False, window_size: tuple[int, int] = NO_WINDOW,
                                softcap: float = 0.0, sinks: torch.Tensor | None = None, return_lse: bool = False,
                                softmax_scale: float | None = None):
    """Ring attention over packed sequences: this rank's q (n, Hq, D), k (m, Hkv, D), v (m, Hkv, Dv) and
    the global cu_seqlens -> this rank's out (n, Hq, Dv) [, lse (Hq, n)].

    Each sequence is its own problem (causal and windows align bottom-right within it), as in
    mfa_hf.flash_attn_varlen_func on the whole stream. Causal work is balanced by zig-zag over the
    stream (exactly for one sequence, approximately for many; needs n and m even). The ring stops
    once no rank has keys left to see, so short sequences and windows stop it early.
    """
    checked = validate(group, q, k, v, causal, window_size, softcap, sinks, softmax_scale, packed=True,
                       local_check=lambda g: check_packing(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                           max_seqlen_k, g.size), extra_name=PACKING)
    offsets_q, offsets_k = checked.extra
    plan = RingPlan.build(checked.group.size, q.shape[0], k.shape[0], checked.window, offsets_q, offsets_k)
    options = BlockOptions(checked.scale, checked.window, checked.softcap)
    out, lse = RingAttention.apply(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), sinks, checked.group, plan,
                                   options)
    return (out[0], lse[0]) if return_lse else out[0]


def ulysses_flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                   cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, group=None,
                                   causal: bool = False, window_size: tuple[int, int] = NO_WINDOW,
                                   softcap: float = 0.0, sinks: torch.Tensor | None = None,
                                   return_lse: bool = False, softmax_scale: float | None = None):
    """Ulysses attention over packed sequences: same call and result as ring_flash_attn_varlen_func;
    Hq and Hkv must divide by the group size."""

    def local_check(g):
        check_heads(q.unsqueeze(0), k.unsqueeze(0), g)
        return check_packing(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, g.size)

    checked = validate(group, q, k, v, causal, window_size, softcap, sinks, softmax_scale, packed=True,
                       local_check=local_check, extra_name=PACKING)

    def attend(q_, k_, v_, sinks_):
        out, lse = flash_attn_varlen_func(q_[0], k_[0], v_[0], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          softmax_scale=checked.scale, window_size=checked.window,
                                          softcap=checked.softcap, sinks=sinks_, return_lse=True)
        return out.unsqueeze(0), lse.unsqueeze(0)

    result = ulysses_attention(checked.group, q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), sinks, attend,
                               return_lse)
    return (result[0][0], result[1][0]) if return_lse else result[0]
