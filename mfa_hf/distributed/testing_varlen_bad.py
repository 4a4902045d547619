"""Bad varlen calls for the context-parallel tests: a packing that does not match the shards, or that the
ranks disagree on; each must raise on every involved rank, naming the argument."""

from __future__ import annotations

import torch

from .testing import Context

BAD_VARLEN_CALLS = ("local_offsets", "ranks_disagree", "max_seqlen_too_small", "float_offsets", "count_mismatch")

EXPECTED = {  # what every involved rank's error must name
    "local_offsets": "cu_seqlens_q: expected the offsets of the whole packed stream, ending at 2 ranks x 8 tokens",
    "ranks_disagree": "cu_seqlens_q/cu_seqlens_k: expected the same values on every rank",
    "max_seqlen_too_small": "max_seqlen_k: expected at least the longest sequence (10)",
    "float_offsets": "cu_seqlens_q: expected dtype int32 or int64",
    "count_mismatch": "cu_seqlens_k: expected 3 offsets like cu_seqlens_q",
}


def bad_varlen_call(context: Context, payload: tuple):
    """Worker task: one kind of mistake (BAD_VARLEN_CALLS) over the first `ranks` ranks; what each raised."""
    from . import ring_flash_attn_varlen_func

    ranks, kind = payload
    group = context.group_of(ranks)
    if group is None:
        return None
    q, k, v = (torch.randn(8, 4, 16) for _ in range(3))
    cu_q = cu_k = torch.tensor([0, 6, 16], dtype=torch.int32)
    max_q = max_k = 10
    if kind == "local_offsets":  # this rank's own packing instead of the global one
        cu_q = cu_k = torch.tensor([0, 3, 8], dtype=torch.int32)
    elif kind == "ranks_disagree" and context.rank == 1:
        cu_q = cu_k = torch.tensor([0, 7, 16], dtype=torch.int32)
    elif kind == "max_seqlen_too_small":
        max_k = 9
    elif kind == "float_offsets":
        cu_q = cu_q.float()
    elif kind == "count_mismatch":
        cu_k = torch.tensor([0, 16], dtype=torch.int32)
    ring_flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, group=group)
    return "no error"
