"""Facts about a mask, computed once per mask object.

Every layer of one forward pass receives the same mask tensor. Reading it on the host (a sync, which
on mps/cuda waits for the device) in every layer would stall the model once per layer; the first
layer computes the fact and the others reuse it. An entry is valid while the tensor is alive and
unmodified (its version counter), for the same question (key). Inference tensors (made under
torch.inference_mode) have no version counter: their facts are computed every time.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

T = TypeVar("T")

# A few entries: hybrid models alternate a full-attention and a sliding-window mask.
_SIZE = 8
_entries: list = []  # [(weakref to mask, mask._version, key, value)], newest first


def once_per_mask(mask: torch.Tensor, key: tuple, compute: Callable[[], T]) -> T:
    if mask.is_inference():  # no version counter: an in-place change could not be seen, so no reuse
        return compute()
    for ref, version, known_key, value in _entries:
        if ref() is mask and version == mask._version and known_key == key:
            return value
    value = compute()
    _entries.insert(0, (weakref.ref(mask), mask._version, key, value))
    del _entries[_SIZE:]
    return value


# -- the pattern a compact mask stands for ----------------------------------------------------------
# A compact mask (None, key validity, packed ids) drops the pattern eager applies: whether it is
# causal, and its sliding window. The attention functions get both as module attributes / kwargs, but
# some models disagree with their own mask: no window kwarg (Qwen2-MoE, PhiMoE), a window off by one
# (T5Gemma's bidirectional encoder), is_causal=False layers under a causal mask (PaliGemma without
# token_type_ids). So the mask functions tag what they return with the pattern; a mask made only to
# carry the tag (every key valid) is marked synthetic and read as no mask.
_tags: list = []  # [(weakref to mask, Pattern)], newest first


@dataclass(frozen=True)
class Pattern:
    causal: bool
    window: int | None  # attention-function convention: keys at distance < window are visible
    synthetic: bool = False


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
