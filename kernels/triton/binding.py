"""Argument binding shared by the triton launchers (forward, backward, decode): every tensor is
addressed through strides, broadcast dimensions with stride 0; an absent optional tensor is bound as
q (never read: its constexpr flag is off).

Imports no triton: the launchers' plumbing, not device code.
"""

from __future__ import annotations

import functools

import torch

from ..contract import AttentionCall
from ..dropout import MASK32, drop_threshold
from .blocks import padded_dim


def strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, seq, head, dim) strides; a packed (T, H, D) tensor has batch stride 0."""
    return tuple(t.stride()) if t.dim() == 4 else (0, *t.stride())


def lse_strides(lse: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of (B, Hq, Lq) or packed (Hq, Tq)."""
    return tuple(lse.stride()) if lse.dim() == 3 else (0, *lse.stride())


def mask_args(attn_mask, q, batch: int, lq: int, lk: int):
    """(mask as the kernel reads it, its (b, h, q, k) strides, MASK_KIND)."""
    if attn_mask is None:
        return q, (0, 0, 0, 0), 0
    mask = attn_mask.view(torch.uint8) if attn_mask.dtype == torch.bool else attn_mask
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(batch, q.shape[-2], lq, lk)
    return mask, tuple(mask.stride()), 1 if attn_mask.dtype == torch.bool else 2


def alibi_args(alibi_slopes, q):
    """(slopes, their (batch, head) strides)."""
    if alibi_slopes is None:
        return q, (0, 0)
    if alibi_slopes.dim() == 1:
        return alibi_slopes, (0, alibi_slopes.stride(0))
    return alibi_slopes, tuple(alibi_slopes.stride())


def dropout_args(dropout_p: float, dropout_seed):
    """(seed, keep threshold, keep scale) for the kernels' dropout hash (kernels/dropout.py)."""
    if dropout_p == 0:
        return 0, 0, 1.0
    return int(dropout_seed.item()) & MASK32, drop_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32:
        return "ieee"  # tf32 would carry ~1e-3 relative error: float32 callers expect float32 accuracy
    return "upcast" if device.type == "cpu" and dtype == torch.bfloat16 else "tf32"


# Half-precision softcap through the GPU's tanh.approx.f32 (one MUFU instruction, relative error below 2^-10.9) instead
# of common.tanh's exact series/exp form (~25 instructions a score): its error is below the rounding of the float16 or
# bfloat16 scores the tolerance rule compares with. float32 keeps the exact form. H100, session 21: the GPU tests
# with it (forward, gradients, decode) pass, and softcap 30 at 8k runs 2.06x faster forward and 1.50x forward +
# backward (flex_features.py times both; a benchmark flips it, then forgets the launch plans).
HARDWARE_TANH = True


def softcap_mode(softcap: float, dtype: torch.dtype, device: torch.device) -> int:
    """The SOFTCAP constexpr: 0 no softcap, 1 common.tanh, 2 the hardware's tanh.approx (CUDA compute capability
    7.5 or later, float16/bfloat16). Called when a launch plan is made, not per call."""
    if softcap <= 0:
        return 0
    half = dtype in (torch.float16, torch.bfloat16)
    return 2 if HARDWARE_TANH and half and cuda_capability_at_least(device, (7, 5)) else 1  # tanh.approx: Turing on


def cuda_capability_at_least(device: torch.device, version: tuple[int, int]) -> bool:
    """Whether `device` is a CUDA device of compute capability `version` or later (torch caches the properties)."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= version


def common_meta(call: AttentionCall):
    """(the constexprs the forward and backward kernels share, window left, window right)."""
    q, v, attn_mask, o = call.q, call.v, call.attn_mask, call.options
    window_left, right, softcap = o.window_left, o.window_right, o.softcap
    return dict(
        HEAD_DQK=q.shape[-1], HEAD_DV=v.shape[-1], BLOCK_DQK=padded_dim(q.shape[-1]),
        BLOCK_DV=padded_dim(v.shape[-1]), HAS_LEFT=window_left >= 0, HAS_RIGHT=right >= 0,
        SOFTCAP=softcap_mode(softcap, q.dtype, q.device),
        MASK_KIND=0 if attn_mask is None else (1 if attn_mask.dtype == torch.bool else 2),
        ALIBI=call.alibi_slopes is not None, VARLEN=call.varlen, DROPOUT=o.dropout_p > 0,
        DOT_PRECISION=dot_precision(q.dtype, q.device),
    ), max(window_left, 0), max(right, 0)


def on_tensors_device(launcher):
    """Run `launcher` with its first tensor's CUDA device current: Triton launches on the current
    device, not the tensors', and a model spread over GPUs (device_map="auto") calls layers on
    several. Switches only when they differ, so the usual call pays one comparison."""

    @functools.wraps(launcher)
    def launch(call, *args, **kwargs):
        device = call.q.device
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return launcher(call, *args, **kwargs)
        return launcher(call, *args, **kwargs)

    return launch
