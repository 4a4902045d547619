"""The `metal` backend: the FlashAttention-2 forward as Metal kernels (torch.mps.compile_shader).

Serves `mps` tensors, and CPU tensors through the MSL emulator when MFA_METAL_EMULATOR=1 (CI).
Forward (attention_forward.metal), backward (attention_backward.metal: delta, dQ, dK/dV) and
KV-cache decode over plain or quantized caches (attention_decode.metal).
"""

from __future__ import annotations

import torch

from mfa_hf import kv_formats
from mfa_hf.problem import AttentionProblem

from ..contract import BackendDefinition, head_dims_beyond
from .append import append_call
from .backward import backward
from .decode import decode
from .decode import replay as decode_replay
from .emulator.runtime_select import emulator_enabled
from .emulator.targets import bfloat_available
from .forward import forward, replay
from .loader import MSL_TYPES, runtime_msl_version

NAME = "metal"


def supports(problem: AttentionProblem) -> tuple[bool, str]:
    where = _device_reason(problem.device_type)
    if where:
        return False, where
    if problem.dtype not in MSL_TYPES:
        return False, f"dtype {problem.dtype}: the Metal kernels take float16, bfloat16 and float32"
    if problem.dtype == torch.bfloat16:
        version = runtime_msl_version(problem.device_type)
        if not bfloat_available(version):
            return False, (f"bfloat16: torch compiles Metal shaders as MSL {version} here, and `bfloat` needs "
                           "MSL 3.1 (macOS 14, or a newer torch)")
    too_wide = head_dims_beyond(problem.head_dim_qk, problem.head_dim_v, "Metal")
    if too_wide:
        return False, too_wide
    if problem.dropout_p > 0:
        return False, "dropout is served by the torch backend"
    if problem.kv_format != "none":
        unread = kv_formats.unread(problem.kv_format, "metal")
        if unread:
            return False, f"the Metal decode kernels do not read {unread} caches (the torch backend does)"
        return True, f"the Metal decode kernels read {problem.kv_format} codes in-kernel"
    return True, "the Metal forward and backward kernels serve this problem"


def _device_reason(device_type: str) -> str:
    if device_type == "mps":
        return "" if torch.backends.mps.is_available() else "torch reports no usable mps device"
    if device_type == "cpu" and emulator_enabled():
        return ""
    if device_type == "cpu":
        return "cpu tensors run on the Metal backend only under the emulator (MFA_METAL_EMULATOR=1)"
    return f"device {device_type}: the Metal backend serves mps tensors"


# A kernel that cannot be compiled or launched on this machine hands its calls to the torch backend
# (same semantics; the append to the generic write) with one warning, unless MFA_BACKEND=metal
# (mfa_hf/kernel_fallback.py).
BACKEND = BackendDefinition(NAME, supports, forward, backward, decode, append=append_call,
                            device_types=("mps", "cpu"), fallback="torch", forward_replay=replay,
                            decode_replay=decode_replay)
