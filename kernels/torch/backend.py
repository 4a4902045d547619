"""The `torch` backend: chunked online softmax in PyTorch ops, every feature, any device, O(N) memory.

Packed (varlen) batches are served one sequence at a time with Python offsets (sequences.py): this
backend is the always-correct fallback, not the fast path, and reading cu_seqlens on the host is its
price (with a check of their values: the API layer trusts device offsets, as FlashAttention-2 does).
"""

from __future__ import annotations

from mfa_hf.problem import AttentionProblem

from ..contract import BackendDefinition
from .backward import backward
from .decode import decode
from .forward import forward

NAME = "torch"


def supports(problem: AttentionProblem) -> tuple[bool, str]:
    return True, "the torch backend serves every feature on every device"


BACKEND = BackendDefinition(NAME, supports, forward, backward, decode, bf16_backward=True)
