"""The `triton` backend (Triton kernels for CUDA tensors).

Not built yet: until the Triton kernels land, this backend declines every problem with that reason,
so `auto` dispatch moves on and `MFA_BACKEND=triton` raises instead of silently using another path.
"""

from mfa_hf.problem import AttentionProblem

NAME = "triton"


def supports(problem: AttentionProblem) -> tuple[bool, str]:
    return False, "the Triton kernels are not part of this build yet"
