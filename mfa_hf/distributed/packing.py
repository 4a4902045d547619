"""The global packing of a varlen context-parallel call, checked against this rank's shard.

Every rank passes its contiguous shard of the packed token stream (rank r holds tokens [r*n, (r+1)*n))
and the same cu_seqlens of the *whole* stream (P*n tokens), as FlashAttention's varlen call takes them
for one process. The ring plans its blocks on the host from those offsets, so they are read back once
per call (a device sync when they live on a GPU).
"""

from __future__ import annotations

import torch

from ..problem import check_cu_seqlens, check_max_seqlen, check_offsets


def check_packing(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets_q, offsets_k) of the whole stream, checked: the right type, count and device, starting at
    0, non-decreasing, ending at size x this rank's tokens; max_seqlen at least the longest sequence."""
    pairs = (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q), ("cu_seqlens_k", cu_seqlens_k, k.shape[0],
                                                                          max_seqlen_k))
    for name, cu, shard, _ in pairs:  # the likely mistake (local offsets) first, with the reason
        if isinstance(cu, torch.Tensor) and cu.dim() == 1 and cu.numel() >= 2 and not cu.is_floating_point() \
                and int(cu[-1]) != size * shard:
            raise ValueError(f"{name}: expected the offsets of the whole packed stream, ending at {size} ranks x "
                             f"{shard} tokens = {size * shard} (each rank passes its contiguous shard and the same "
                             f"global {name}), got offsets ending at {int(cu[-1])}")
    batch, _ = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", size * q.shape[0], None, q.device)
    check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", size * k.shape[0], batch, q.device)
    offsets = []
    for name, cu, shard, max_seqlen in pairs:
        values = [int(x) for x in cu.tolist()]
        check_offsets(values, name, size * shard)
        check_max_seqlen(max_seqlen, name.replace("cu_seqlens", "max_seqlen"), values)
        offsets.append(tuple(values))
    return offsets[0], offsets[1]
