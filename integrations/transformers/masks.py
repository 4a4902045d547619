"""The mask function registered for "mfa": compact masks, dense only for patterns we cannot express.

transformers' mask builders (`create_causal_mask`, `create_sliding_window_causal_mask`,
`create_bidirectional_mask`, ...) call the registered function with the mask *pattern*
(`mask_function`) and the 2-D padding mask. The kernel applies causal and sliding-window masking
itself (from `is_causal` and the `sliding_window` kwarg the attention layers pass), so whenever the
pattern is made only of causal / bidirectional / sliding-window pieces we return:

- None: every key is real (no padding, no unused StaticCache slots);
- a 2-D bool (B, L) key-validity mask: keys [0, L) are the real ones (L < kv_length only for the
  unused tail of a StaticCache) and False marks padding. The attention function keeps keys [:L] and
  aligns causal/window bottom-right within them.

Anything else (image-token `or_mask_function`, packed-sequence block masks, chunked attention, vmap
patterns) gets transformers' own dense `sdpa_mask`, forced to a tensor so that None keeps meaning
"compact".
"""

from __future__ import annotations

import torch

from . import internals

# Leaf mask patterns the kernel expresses through is_causal / window_size, by qualified name:
# the sliding-window overlays are closures, so identity checks cannot be used for them.
_EXPRESSIBLE = {
    "causal_mask_function",
    "bidirectional_mask_function",
    "sliding_window_overlay.<locals>.inner_mask",
    "sliding_window_bidirectional_overlay.<locals>.inner_mask",
}


def is_expressible(mask_function, use_vmap: bool = False) -> bool:
    """True when the kernel's causal/window flags plus key validity reproduce `mask_function`."""
    return not use_vmap and all(leaf in _EXPRESSIBLE for leaf in internals.mask_leaves(mask_function))


def _real_key_count(q_length, kv_length, q_offset, kv_offset, causal: bool) -> int:
    """How many leading keys hold real tokens: a StaticCache hands over its whole buffer."""
    if not causal:
        return kv_length
    filled = int(q_offset) + q_length - int(kv_offset)
    return max(0, min(kv_length, filled))


def _is_causal_pattern(mask_function) -> bool:
    return any("causal" in leaf or leaf.startswith("sliding_window_overlay") for leaf in internals.mask_leaves(mask_function))


def compact_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, use_vmap=False, device="cpu", **kwargs):
    """Registered under "mfa" in AttentionMaskInterface; returns None, (B, L) bool, or dense 4-D."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = mask_function or causal_mask_function
    if not is_expressible(mask_function, use_vmap):
        kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         use_vmap=use_vmap, device=device, **kwargs)
    length = _real_key_count(q_length, kv_length, q_offset, kv_offset, _is_causal_pattern(mask_function))
    if attention_mask is None:
        if length == kv_length:
            return None
        return torch.ones(batch_size, length, dtype=torch.bool, device=device)
    valid = attention_mask.to(device=device, dtype=torch.bool)
    end = int(kv_offset) + length
    if valid.shape[-1] < end:  # the 2-D mask covers past + current tokens only
        valid = torch.nn.functional.pad(valid, (0, end - valid.shape[-1]), value=False)
    valid = valid[:, int(kv_offset):end]
    if length == kv_length and bool(valid.all()):
        return None
    return valid
