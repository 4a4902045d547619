"""`torch.ops.mfa.flash_attention`: mps-flash-attn's custom op, by name and schema, served by our ops.

mps-flash-attn 0.2.x defined, in its register_custom_op(),

    mfa::flash_attention(Tensor query, Tensor key, Tensor value, bool is_causal=False,
                         Tensor? attn_mask=None, int window_size=0) -> Tensor

over (B, H, S, D) tensors. mfa_hf.register_custom_op() defines the same name and arguments (window_size
also takes None, as that package's README example passes) as a thin alias: one CompositeImplicitAutograd
kernel that translates the arguments and calls mfa_hf.flash_attention, so it runs our custom ops, which
have fake functions and a registered backward. torch.compile(fullgraph=True) traces through it and
autograd differentiates it; there is no second implementation here.

Arguments keep mps-flash-attn's meaning, which differs from mfa_hf.flash_attention's in two places:
- window_size: 0 or None is full attention; w > 0 lets query i see keys i - w .. i (with is_causal;
  without it, every key from i - w on): w + 1 keys, where mfa_hf.flash_attention(window_size=w) means w.
- attn_mask: bool or uint8, True / non-zero = masked out (mfa_hf.flash_attention's bool masks follow
  SDPA: True = attend). Float masks are refused: mps-flash-attn had no additive mask on this op.
Causal and windows align top-left when Lq != Lk, as mps-flash-attn's kernel does (mps_visibility.py: flags that
see the same keys, a bool mask only where none can), the same as the rest of
mfa_hf.mps_flash_attn. docs/migrating.md lists every difference.
"""

from __future__ import annotations

import threading

import torch

from . import scalars

NAMESPACE = "mfa"
NAME = "flash_attention"
SCHEMA = (f"{NAME}(Tensor query, Tensor key, Tensor value, bool is_causal=False, Tensor? attn_mask=None, "
          "int? window_size=None) -> Tensor")

_lock = threading.Lock()
_library = None  # the torch.library.Library holding the definition (kept alive: dropping it unregisters)


def register_custom_op() -> bool:
    """Define torch.ops.mfa.flash_attention (idempotent). Returns True, as mps-flash-attn's did.

    Raises RuntimeError when another package (an older mps-flash-attn) already defined the name."""
    global _library
    with _lock:
        if _library is not None:
            return True
        if _defined_elsewhere():
            raise RuntimeError(
                f"register_custom_op: torch.ops.{NAMESPACE}.{NAME} is already defined by another package "
                "(mps_flash_attn's register_custom_op?); call only one of the two in a process")
        library = torch.library.Library(NAMESPACE, "FRAGMENT")
        library.define(SCHEMA)
        library.impl(NAME, _alias, "CompositeImplicitAutograd")
        _library = library
    return True


def _defined_elsewhere() -> bool:
    try:
        getattr(getattr(torch.ops, NAMESPACE), NAME)
    except (AttributeError, RuntimeError):
        return False
    return True


def _alias(query, key, value, is_causal=False, attn_mask=None, window_size=None):
    from .api import flash_attention  # local: the public API imports the core, which is not needed before a call
    from .mps_visibility import visibility  # local: it imports mps_window from here

    key, value, causal, window, keep = visibility(query, key, value, is_causal, window_size, mps_mask(attn_mask))
    return flash_attention(query, key, value, is_causal=causal, attn_mask=keep, window_size=window)


def mps_window(window_size, is_causal: bool):
    """mps-flash-attn's window_size as our (left, right) pair, or None for full attention."""
    if window_size is None:
        return None
    expected = "0 or None (full attention) or an int >= 1 (keys before the query's own that it sees)"
    window = scalars.int_like(window_size, "window_size", expected)  # 2.5 or True is refused, not truncated
    if window < 0:
        raise ValueError(f"window_size: expected {expected}, got {window}")
    return None if window == 0 else (window, 0 if is_causal else -1)


def mps_mask(attn_mask):
    """mps-flash-attn's mask (True / non-zero = masked out) as ours (True = attend)."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask: expected a torch.Tensor (mps-flash-attn's bool or uint8 mask, True = masked out) "
                        f"or None, got {type(attn_mask).__module__}.{type(attn_mask).__name__}")
    if attn_mask.dtype == torch.bool:
        return ~attn_mask
    if attn_mask.dtype == torch.uint8:
        return attn_mask == 0
    raise TypeError(f"attn_mask: torch.ops.{NAMESPACE}.{NAME} takes mps-flash-attn's bool or uint8 mask (True = "
                    f"masked out), got {attn_mask.dtype}; for an additive float mask call mfa_hf.flash_attention")
