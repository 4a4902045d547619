"""`flash_attn.layers.rotary` while the shim is enabled: rotary position embeddings in plain torch.

apply_rotary_emb follows FlashAttention 2.8.3's signature and meaning (unchanged since 2.6.3). The rotation is computed
in float32 (float64 for float64 input) and stored in x's dtype; cos/sin may have any float dtype
(FA2's kernel requires x's); autograd works through it (the backward is the inverse
rotation). flash_attn_with_kvcache's rotary_cos / rotary_sin use the same code (rotate_at).
"""

from __future__ import annotations

import torch

from mfa_hf.problem import check_cu_seqlens, shape_is


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-D {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)


def check_cos_sin(cos, sin, head_dim: int, names=("cos", "sin"), device: torch.device | None = None) -> int:
    """Validate (seqlen_ro, rotary_dim / 2) tables (on `device` when given); returns rotary_dim."""
    for name, table in zip(names, (cos, sin)):
        if not isinstance(table, torch.Tensor) or table.dim() != 2 or not table.is_floating_point():
            raise ValueError(f"{name}: expected a 2-D float tensor (seqlen_ro, rotary_dim / 2), got {_describe(table)}")
        if device is not None and table.device != device:
            raise ValueError(f"{name}: expected device {device} like the rotated tensor, got {table.device}")
    if tuple(sin.shape) != tuple(cos.shape):
        raise ValueError(f"{names[1]}: expected shape {tuple(cos.shape)} like {names[0]}, got {tuple(sin.shape)}")
    rotary_dim = 2 * cos.shape[1]
    if rotary_dim > head_dim:
        raise ValueError(f"{names[0]}: expected rotary_dim = 2 * {cos.shape[1]} <= head dim {head_dim}, got {rotary_dim}")
    return rotary_dim


def rotate_at(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
              interleaved: bool) -> torch.Tensor:
    """Rotate the first rotary_dim channels of x (..., S, H, D) by the angles of table rows
    `positions` (..., S) (a position beyond the table leaves its token unrotated, as FA2's kernel
    does). Returns a new tensor in x's dtype."""
    rotary_dim = 2 * cos.shape[1]
    if rotary_dim == 0:
        return x.clone()
    compute = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 input
    positions = positions.to(device=x.device, dtype=torch.int64)
    inside = (positions >= 0) & (positions < cos.shape[0])
    rows = positions.clamp(0, max(cos.shape[0] - 1, 0))
    c = torch.where(inside[..., None], cos.to(x.device, compute)[rows], 1.0)[..., None, :]  # (..., S, 1, R/2)
    s = torch.where(inside[..., None], sin.to(x.device, compute)[rows], 0.0)[..., None, :]
    part = x[..., :rotary_dim].to(compute)
    if interleaved:  # pairs (0, 1), (2, 3), ... (GPT-J)
        x1, x2 = part[..., 0::2], part[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:  # halves: channel i pairs with i + rotary_dim / 2 (GPT-NeoX)
        x1, x2 = part.chunk(2, dim=-1)
        rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def _offsets(seqlen_offsets, batch: int, device) -> torch.Tensor:
    if isinstance(seqlen_offsets, torch.Tensor):
        if seqlen_offsets.is_floating_point() or not shape_is(seqlen_offsets.shape, (batch,), ()):
            raise ValueError(f"seqlen_offsets: expected an int or an integer tensor of shape ({batch},), "
                             f"got {_describe(seqlen_offsets)}")
        return seqlen_offsets.to(device=device, dtype=torch.int64).expand(batch)
    try:
        value = int(seqlen_offsets) if not isinstance(seqlen_offsets, (bool, float)) else None
    except TypeError:
        value = None
    if value is None:
        raise ValueError(f"seqlen_offsets: expected an int or an integer tensor of shape ({batch},), "
                         f"got {seqlen_offsets!r}")
    return torch.full((batch,), value, dtype=torch.int64, device=device)


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    """Rotary embedding of the first rotary_dim = 2 * cos.shape[1] channels of x.

    x: (batch, seqlen, nheads, headdim), or packed (total, nheads, headdim) with cu_seqlens
    (batch + 1,). cos, sin: (seqlen_ro, rotary_dim / 2). Token s of sequence b sits at position
    s + seqlen_offsets[b] (an int offsets every sequence alike). interleaved=True rotates channel
    pairs (0, 1), (2, 3), ... (GPT-J); False pairs channel i with i + rotary_dim / 2 (GPT-NeoX).
    inplace=True writes the result into x and returns x. max_seqlen is accepted for FA2
    compatibility (the positions come from cu_seqlens).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != (3 if cu_seqlens is not None else 4):
        layout = "(total, nheads, headdim) with cu_seqlens" if cu_seqlens is not None else "(batch, seqlen, nheads, headdim)"
        raise ValueError(f"x: expected a float tensor {layout}, got {_describe(x)}")
    check_cos_sin(cos, sin, x.shape[-1], device=x.device)
    if cu_seqlens is None:
        batch, seqlen = x.shape[0], x.shape[1]
        offsets = _offsets(seqlen_offsets, batch, x.device)
        positions = offsets[:, None] + torch.arange(seqlen, device=x.device)[None, :]
    else:
        # int32/int64 offsets from 0, non-decreasing, ending at x's total (values read where that is free).
        check_cu_seqlens(cu_seqlens, "cu_seqlens", x.shape[0], None, cu_seqlens.device)
        cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
        batch = cu.numel() - 1
        offsets = _offsets(seqlen_offsets, batch, x.device)
        tokens = torch.arange(x.shape[0], device=x.device)
        sequence = (torch.searchsorted(cu[1:], tokens, right=True)).clamp(max=max(batch - 1, 0))
        positions = tokens - cu[sequence] + offsets[sequence] if batch else tokens
    out = rotate_at(x, cos, sin, positions, interleaved)
    if inplace:
        x.copy_(out)
        return x
    return out


apply_rotary_emb_func = apply_rotary_emb  # FA2's older name

__all__ = ["apply_rotary_emb", "apply_rotary_emb_func"]
