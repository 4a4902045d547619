"""The one place where diffusers-shaped attention calls reach our kernel.

Diffusers hands attention either (B, H, S, D) tensors (the processors, in SDPA's layout) or
(B, S, H, D) tensors (the dispatcher). Both reach `mfa_hf.flash_attn_func`, whose layout is
(B, S, H, D); a BHSD view is transposed for free (the kernel reads strides).

SDPA semantics kept here: `is_causal` aligns top-left when Lq != Lk (our kernel aligns
bottom-right; mfa_hf.sdpa_semantics translates it into causal, a window, or causal over the first Lq
keys, never a mask), `is_causal` with a mask means the mask AND top-left causal (as torch's SDPA computes
the pair where it accepts it), unequal head counts need `enable_gqa`, and batch dims of 1 broadcast. Known difference: a query row whose keys are all masked out gives 0 here where
SDPA gives NaN.
"""

from __future__ import annotations

import torch

from mfa_hf import sdpa_semantics
from mfa_hf.api import flash_attn_func


def attend_bhsd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """SDPA-shaped call: (B, H, S, D) in, (B, H, Lq, Dv) out (a transposed view of a BSHD result)."""
    query, key, value = broadcast_batch(query, key, value)
    out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                          softmax_scale=scale, attn_mask=attn_mask)
    return out.transpose(1, 2)


def attend_bshd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False):
    """The dispatcher's call: (B, S, H, D) in, (B, Lq, H, Dv) out, and lse (B, Lq, H) float32."""
    _check_heads(query, key, enable_gqa)
    query, key, value = broadcast_batch(query, key, value)
    attn_mask = _mask_to_4d(attn_mask, query, key)
    sdpa = sdpa_semantics.translate(query.shape[1], key.shape[1], is_causal)
    key, value = sdpa.keep_keys(key, value, seq_dim=1)
    attn_mask = sdpa.keep_mask(attn_mask)
    result = flash_attn_func(query, key, value, dropout_p=dropout_p, softmax_scale=scale, causal=sdpa.causal,
                             window_size=sdpa.window, return_lse=return_lse, attn_mask=attn_mask)
    if not return_lse:
        return result
    out, lse = result
    # Our lse is (B, H, Lq); diffusers' backends that return one (the context-parallel ops, sage,
    # flash-3) use the BSHD-consistent (B, Lq, H).
    return out, lse.transpose(1, 2)


def broadcast_batch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple:
    """SDPA broadcasts the batch dim: K/V of batch 1 serve every query row (Wan with num_videos_per_prompt=2 passes
    its prompt embeddings unrepeated), and one query row every K/V row. Expanded views (stride 0, no copy); batches
    that do not broadcast are left for flash_attn_func to refuse by name."""
    sizes = {query.shape[0], key.shape[0], value.shape[0]}
    if len(sizes) == 1 or len(sizes - {1}) != 1:
        return query, key, value
    (batch,) = sizes - {1}
    return tuple(t.expand(batch, *t.shape[1:]) for t in (query, key, value))


def _check_heads(query: torch.Tensor, key: torch.Tensor, enable_gqa: bool) -> None:
    heads_q, heads_kv = query.shape[2], key.shape[2]
    if heads_q != heads_kv and not enable_gqa:
        raise ValueError(f"key: expected {heads_q} heads like query (pass enable_gqa=True for grouped-query "
                         f"attention, as with SDPA), got {heads_kv}")


def _mask_to_4d(attn_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """A 2-D (B, Lk) key-padding mask means (B, 1, 1, Lk), as diffusers' native backend reads it."""
    if attn_mask is None or attn_mask.dim() != 2:
        return attn_mask
    if tuple(attn_mask.shape) == (query.shape[0], key.shape[1]):
        return attn_mask[:, None, None, :]
    return attn_mask  # SDPA reads any other 2-D mask as (Lq, Lk); broadcasting does the same
