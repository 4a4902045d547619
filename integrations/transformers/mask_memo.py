"""Facts about a mask, computed once per mask object.

Every layer of one forward pass receives the same mask tensor. Reading it on the host (a sync, which
on mps/cuda waits for the device) in every layer would stall the model once per layer; the first
layer computes the fact and the others reuse it. An entry is valid while the tensor is alive and
unmodified (its version counter), for the same question (key). Inference tensors (made under
torch.inference_mode) have no version counter: their facts are computed every time.
"""

from __future__ import annotations

import weakref
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
