"""Batching rules of the attention and decode ops (torch.func.vmap): the vmapped dimension folds into the batch.

Without a rule, vmap runs an op once per sample (torch's fallback loop, with its performance warning); the
per-sample-gradient recipe (vmap of grad) and jacrev (vmap over cotangents) then launch one kernel per sample.
Attention is already batched over B, so a call over V samples of batch B is one call over a batch of V x B:
per-sample tensors gain the samples as leading rows (unbatched ones are repeated, a mask or slopes shared by
the batch are expanded to it), and the results are split back into (V, B, ...).

Folding gives exactly the per-sample results where every batch row is independent. Three things are not, and
those calls keep the per-sample loop: packed sequences (cu_seqlens index the packed rows), dropout (its mask hashes
the batch row, so folded samples would draw other masks than the loop's), and a gradient for sinks (summed over the
batch in one kernel, where each sample needs its own sum). The decode folds its queries (and lengths, slopes) while
the cache is shared: the folded rows read it through cache_batch_idx, so the cache is never copied; a cache batched
over the samples, sinks batched over them, or a residual block keep the loop.
"""

from typing import Callable, Optional

import torch
from torch import Tensor

# Positions in the ops' flat arguments (ops.define_ops; the backward's start after its 5 gradient arguments).
Q, K, V, MASK, SLOPES, SINKS, CU_Q, CU_K, SEED = range(9)
DROPOUT_P = 13  # after scale, window_left, window_right, softcap
GRADIENTS = 5  # grad_out, grad_lse, out, lse, want_mask_grad


def _per_sample(op: Callable, size: int, in_dims, args) -> tuple:
    """torch's fallback, written out: the op once per sample, results stacked on dim 0."""
    results = [op(*[a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)]) for i in range(size)]
    outputs = tuple(torch.stack(parts) for parts in zip(*results))
    return outputs, (0,) * len(outputs)


def _rows(x: Tensor, dim: Optional[int], size: int, batch: int) -> Tensor:
    """A per-sample (B or 1, ...) tensor as (size * batch, ...): samples first, a broadcast batch expanded."""
    x = x.movedim(dim, 0) if dim is not None else x.unsqueeze(0).expand(size, *x.shape)
    x = x.expand(size, batch, *x.shape[2:])
    return x.reshape(size * batch, *x.shape[2:])


def _four_d(mask: Tensor, dim: Optional[int]) -> tuple[Tensor, Optional[int]]:
    """A mask in its (B, H, Lq, Lk) form per sample (leading ones added), the samples (if batched) on dim 0."""
    if dim is not None:
        mask, dim = mask.movedim(dim, 0), 0
    per_sample = mask.shape[1:] if dim is not None else mask.shape
    full = (1,) * (4 - len(per_sample)) + tuple(per_sample)
    return mask.reshape(*mask.shape[:1 if dim is not None else 0], *full), dim


def _mask_rows(mask: Tensor, dim: Optional[int], size: int, batch: int, expand: bool) -> Tensor:
    """The mask for the folded call. An unbatched mask broadcast over the batch stays as it is (it broadcasts over the
    folded batch too) unless `expand` (its gradient is wanted per sample)."""
    mask, dim = _four_d(mask, dim)
    if dim is None and mask.shape[0] == 1 and not expand:
        return mask
    return _rows(mask, dim, size, batch)


def _slope_rows(slopes: Tensor, dim: Optional[int], size: int, batch: int) -> Tensor:
    """ALiBi slopes (H,) or (B, H) per sample as (size * batch, H)."""
    if dim is None and slopes.dim() == 1:
        return slopes
    if slopes.dim() - (dim is not None) == 1:  # (H,) per sample
        slopes = (slopes.movedim(dim, 0) if dim is not None else slopes.unsqueeze(0).expand(size, -1)).unsqueeze(1)
        dim = 0
    return _rows(slopes, dim, size, batch)


def _foldable(args, in_dims, first: int) -> bool:
    """No packed sequences, no dropout, and sinks (if any) shared by every sample."""
    packed = args[first + CU_Q] is not None
    dropout = args[first + DROPOUT_P] > 0
    return not (packed or dropout or in_dims[first + SINKS] is not None)


def _folded_inputs(args, in_dims, first: int, size: int, expand_mask: bool) -> tuple[list, int]:
    """The op's arguments for the folded call (from position `first` on: q, k, v, mask, slopes, ...) and B."""
    q, q_dim = args[first + Q], in_dims[first + Q]
    batch = q.movedim(q_dim, 0).shape[1] if q_dim is not None else q.shape[0]
    out = list(args)
    for i in (Q, K, V):
        out[first + i] = _rows(args[first + i], in_dims[first + i], size, batch)
    if args[first + MASK] is not None:
        out[first + MASK] = _mask_rows(args[first + MASK], in_dims[first + MASK], size, batch, expand_mask)
    if args[first + SLOPES] is not None:
        out[first + SLOPES] = _slope_rows(args[first + SLOPES], in_dims[first + SLOPES], size, batch)
    return out, batch


def _split(x: Tensor, size: int) -> Tensor:
    return x.reshape(size, x.shape[0] // size, *x.shape[1:])


def forward_rule(op: Callable) -> Callable:
    """The attention forward op's batching rule (registered by ops.define_ops)."""

    def rule(info, in_dims, *args):
        size = info.batch_size
        if not _foldable(args, in_dims, 0):
            return _per_sample(op, size, in_dims, args)
        folded, _ = _folded_inputs(args, in_dims, 0, size, expand_mask=False)
        out, lse = op(*folded)
        return (_split(out, size), _split(lse, size)), (0, 0)

    return rule


def backward_rule(op: Callable) -> Callable:
    """The attention backward op's batching rule: grad_out, grad_lse, out and lse fold like q; the mask's gradient,
    when wanted, comes back per sample in the mask's own batch size."""

    def rule(info, in_dims, *args):
        size, first = info.batch_size, GRADIENTS
        if args[first + SINKS] is not None or not _foldable(args, in_dims, first):
            return _per_sample(op, size, in_dims, args)
        want_mask_grad = args[4]
        folded, batch = _folded_inputs(args, in_dims, first, size, expand_mask=want_mask_grad)
        for i in range(4):  # grad_out, grad_lse (may be None), out, lse: batch first, like q
            if args[i] is not None:
                folded[i] = _rows(args[i], in_dims[i], size, batch)
        dq, dk, dv, dsinks, dmask = op(*folded)
        if want_mask_grad:
            mask, mask_dim = args[first + MASK], in_dims[first + MASK]
            shape = mask.shape if mask_dim is None else mask.movedim(mask_dim, 0).shape[1:]
            dmask = _split(dmask, size)
            if len(shape) < 4 or shape[0] == 1:
                dmask = dmask.sum(1, keepdim=True)  # the batch rows of a mask shared by the batch
            dmask = dmask.reshape(size, *shape)
            mask_out = 0
        else:
            mask_out = None
        return (_split(dq, size), _split(dk, size), _split(dv, size), dsinks, dmask), (0, 0, 0, None, mask_out)

    return rule


# The decode op's flat arguments (ops._define_decode): q, k_codes, k_scales, v_codes, v_scales, seqlens_k,
# cache_batch_idx, alibi_slopes, sinks, then formats and options, then the residual block's three tensors.
DECODE_CACHE, DECODE_SEQLENS, DECODE_ROWS, DECODE_SLOPES, DECODE_SINKS = (1, 2, 3, 4), 5, 6, 7, 8
DECODE_RESIDUAL = (18, 19, 20)


def decode_rule(op: Callable) -> Callable:
    """The decode op's batching rule (registered by ops._define_decode)."""

    def rule(info, in_dims, *args):
        size = info.batch_size
        residual = any(i < len(args) and args[i] is not None for i in DECODE_RESIDUAL)
        if residual or any(in_dims[i] is not None for i in (*DECODE_CACHE, DECODE_SINKS)):
            return _per_sample(op, size, in_dims, args)
        q, q_dim = args[0], in_dims[0]
        batch = q.movedim(q_dim, 0).shape[1] if q_dim is not None else q.shape[0]
        folded = list(args)
        folded[0] = _rows(q, q_dim, size, batch)
        folded[DECODE_SEQLENS] = _rows(args[DECODE_SEQLENS], in_dims[DECODE_SEQLENS], size, batch)
        rows = args[DECODE_ROWS]
        if rows is None:  # the folded rows read the shared cache's rows 0..B-1 again for every sample
            rows = torch.arange(batch, dtype=torch.int32, device=q.device)
        folded[DECODE_ROWS] = _rows(rows, in_dims[DECODE_ROWS], size, batch)
        if args[DECODE_SLOPES] is not None:
            folded[DECODE_SLOPES] = _slope_rows(args[DECODE_SLOPES], in_dims[DECODE_SLOPES], size, batch)
        out, lse = op(*folded)
        return (_split(out, size), _split(lse, size)), (0, 0)

    return rule
