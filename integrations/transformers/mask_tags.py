"""The pattern a compact mask stands for, tagged by the mask functions that made it.

A compact mask (None, key validity, packed ids) drops the pattern eager applies: whether it is
causal, and its sliding window. The attention functions get both as module attributes / kwargs, but
some models disagree with their own mask: no window kwarg (Qwen2-MoE, PhiMoE), a window off by one
(T5Gemma's bidirectional encoder), is_causal=False layers under a causal mask (PaliGemma without
token_type_ids). So the mask functions tag what they return with the pattern; a mask made only to
carry the tag (every key valid) is marked synthetic and read as no mask.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

# A few entries: hybrid models alternate a full-attention and a sliding-window mask.
_SIZE = 8
_tags: list = []  # [(weakref to mask, Pattern)], newest first


@dataclass(frozen=True)
class Pattern:
    causal: bool
    window: int | None  # attention-function convention: keys at distance < window are visible
    synthetic: bool = False
    # The key count transformers asked the mask for (the cache's get_mask_sizes): the layer's K/V must have as
    # many, or the mask describes other keys (None: not known).
    kv_length: int | None = None


def tag_pattern(mask: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    _tags[:] = [entry for entry in _tags if entry[0]() is not None][: _SIZE - 1]
    _tags.insert(0, (weakref.ref(mask), pattern))
    return mask


def tagged_pattern(mask) -> Pattern | None:
    """The Pattern a mask function tagged `mask` with, else None."""
    if mask is not None:
        for ref, pattern in _tags:
            if ref() is mask:
                return pattern
    return None
