"""What the layers of one forward step share, kept on the step's own mask object.

Every layer of one forward pass receives the same mask tensor. Facts read from it on the host (a
sync, which on mps/cuda waits for the device) and the step's decode plan (mfa_hf/decode_plan.py)
are computed by the first layer and kept on that tensor, for the same question (key), while it is
unmodified (its version counter): the other layers reuse them, and they go away with the mask. No
table outlives a step. Inference tensors (torch.inference_mode) have no version counter, and traced
ones (torch.compile) are graph values: their facts are computed every time.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")

_ATTRIBUTE = "mfa_hf_step_facts"  # (version, {key: fact}) on the mask tensor


def once_per_mask(mask: torch.Tensor, key: tuple, compute: Callable[[], T]) -> T:
    if mask.is_inference() or torch.compiler.is_compiling():
        return compute()
    version, facts = getattr(mask, _ATTRIBUTE, (None, None))
    if version != mask._version:
        version, facts = mask._version, {}
        setattr(mask, _ATTRIBUTE, (version, facts))
    if key not in facts:
        facts[key] = compute()
    return facts[key]


class StepPlans:
    """The decode plan of the latest step, for a cache whose steps have no mask to carry it
    (MFAQuantizedCache without padding): every layer of one step asks with the same key."""

    def __init__(self):
        self._key, self._plan = None, None

    def get(self, key: tuple, build: Callable[[], T]) -> T:
        if key != self._key:
            self._key, self._plan = key, build()
        return self._plan
