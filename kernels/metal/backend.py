"""The `metal` backend (Metal Shading Language kernels via torch.mps.compile_shader).

Not built yet: until the Metal kernels land, this backend declines every problem with that reason,
so `auto` dispatch moves on and `MFA_BACKEND=metal` raises instead of silently using another path.
"""

from mfa_hf.problem import AttentionProblem

NAME = "metal"


def supports(problem: AttentionProblem) -> tuple[bool, str]:
    return False, "the Metal kernels are not part of this build yet"
