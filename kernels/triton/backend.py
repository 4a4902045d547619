"""The `triton` backend: Triton kernels for CUDA tensors (forward, backward, every dense/varlen feature,
decode over plain and quantized KV caches).

Importing this module imports triton (through the launchers' kernel modules); where triton is missing
the ImportError makes dispatch report the backend unavailable with that reason. With TRITON_INTERPRET=1
in the environment before triton is imported, the same kernels serve CPU tensors through Triton's
interpreter (how CI tests them on machines without a GPU; tests/triton starts such a process itself).
"""

from __future__ import annotations

import torch

from mfa_hf import kv_formats
from mfa_hf.problem import AttentionProblem

from ..contract import BackendDefinition, head_dims_beyond
from .backward import backward
from .blocks import interpreting
from .decode import decode
from .decode import replay as decode_replay
from .forward import forward, replay

NAME = "triton"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DECODE_FORMATS = tuple(kv_formats.kernel_ids("triton"))  # the formats decode_kernel.py reads
INT32_LIMIT = 2**31  # elements a 32-bit offset reaches (2**31 - 1 is the largest offset)


def supports(problem: AttentionProblem) -> tuple[bool, str]:
    devices = ("cuda", "cpu") if interpreting() else ("cuda",)
    if problem.device_type not in devices:
        return False, f"the triton backend serves cuda tensors, got {problem.device_type}"
    if problem.dtype not in DTYPES:
        return False, f"the triton kernels take float16, bfloat16 or float32, got {problem.dtype}"
    too_wide = head_dims_beyond(problem.head_dim_qk, problem.head_dim_v, "triton")
    if too_wide:
        return False, too_wide
    if problem.largest_span > INT32_LIMIT:
        return False, (f"the triton kernels index tensors with 32-bit offsets, and this call reaches element "
                       f"{problem.largest_span - 1} (2**31 or more; the torch backend serves it)")
    if problem.kv_format != "none":
        unknown = kv_formats.unread(problem.kv_format, "triton")
        if unknown:
            return False, f"the triton decode kernel reads {', '.join(DECODE_FORMATS)} caches, got {unknown}"
    return True, "the triton kernels serve this problem"


BACKEND = BackendDefinition(NAME, supports, forward, backward, decode, device_types=None, bf16_backward=True,
                            forward_replay=replay, decode_replay=decode_replay)
