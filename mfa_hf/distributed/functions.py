"""The public context-parallel functions, in FlashAttention's layout and with its option names.

Every rank of `group` calls the same function with its contiguous shard of the sequence, in natural
order (rank r holds tokens [r*N/P, (r+1)*N/P) of q, k and v), and gets its shard of the output (and of
the LSE) back. Options mean what they mean in mfa_hf.flash_attn_func on the whole sequence: causal and
windows align bottom-right on the global sequence, sinks (Hq,) join every row's softmax once.
"""

from __future__ import annotations

import torch

from ..api import flash_attn_func
from ..problem import NO_WINDOW
from .checks import validate
from .local import BlockOptions
from .ring_function import RingAttention
from .ring_plan import RingPlan
from .ulysses import check_heads, ulysses_attention


def ring_flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, causal: bool = False,
                         window_size: tuple[int, int] = NO_WINDOW, softcap: float = 0.0,
                         sinks: torch.Tensor | None = None, return_lse: bool = False,
                         softmax_scale: float | None = None):
    """Ring attention over `group` (None: the default group). q (B, n, Hq, D), k (B, m, Hkv, D),
    v (B, m, Hkv, Dv): this rank's n query and m key tokens -> out (B, n, Hq, Dv) [, lse (B, Hq, n)].

    K/V travel around the ring one hop per step while each rank computes; per rank memory is O(n + m),
    never the whole sequence. Causal work is balanced by zig-zag sharding inside (needs n and m even,
    else the ring runs unbalanced but exact). A window stops the ring once no rank has keys left to see.
    Gradients: dq, dk, dv for this rank's shards; dsinks is this rank's share (sum it over the group, as
    data parallelism does for any replicated parameter).
    """
    checked = validate(group, q, k, v, causal, window_size, softcap, sinks, softmax_scale)
    plan = RingPlan.build(checked.group.size, q.shape[1], k.shape[1], checked.window)
    options = BlockOptions(checked.scale, checked.window, checked.softcap)
    out, lse = RingAttention.apply(q, k, v, sinks, checked.group, plan, options)
    return (out, lse) if return_lse else out


def ulysses_flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, causal: bool = False,
                            window_size: tuple[int, int] = NO_WINDOW, softcap: float = 0.0,
                            sinks: torch.Tensor | None = None, return_lse: bool = False,
                            softmax_scale: float | None = None):
    """Ulysses attention over `group`: same call and result as ring_flash_attn_func. Two all-to-alls turn
    the sequence split into a head split around one local attention call over the whole sequence, so Hq
    and Hkv must divide by the group size; per rank memory is O(N * H / P) for q/k/v and out."""
    checked = validate(group, q, k, v, causal, window_size, softcap, sinks, softmax_scale,
                       local_check=lambda g: check_heads(q, k, g))

    def attend(q_, k_, v_, sinks_):
        return flash_attn_func(q_, k_, v_, softmax_scale=checked.scale, window_size=checked.window,
                               softcap=checked.softcap, sinks=sinks_, return_lse=True)

    return ulysses_attention(checked.group, q, k, v, sinks, attend, return_lse)
