"""Which diffusers versions this integration is tested against, and the error for the others.

The processors read documented attributes of `Attention` (to_q, norm_q, prepare_attention_mask...)
and check them when they are set, so they degrade into clear errors. The dispatcher backend is
different: diffusers' backend registry is a closed Enum, and adding the "mfa" member touches its
private internals, so it is only done on the versions listed here.
"""

from __future__ import annotations

import re

# Half-open range [low, high). Tested: 0.42.1. Widen only after running model_tests/diffusers.
SUPPORTED_DIFFUSERS_VERSIONS = ((0, 42, 0), (0, 43, 0))


class UnsupportedDiffusersVersion(RuntimeError):
    """The installed diffusers is outside SUPPORTED_DIFFUSERS_VERSIONS."""


def installed_diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _release(version: str) -> tuple[int, int, int]:
    numbers = [int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3]]
    return tuple(numbers + [0] * (3 - len(numbers)))  # type: ignore[return-value]


def supported_range_text() -> str:
    low, high = SUPPORTED_DIFFUSERS_VERSIONS
    return f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"


def diffusers_version_supported(version: str | None = None) -> bool:
    low, high = SUPPORTED_DIFFUSERS_VERSIONS
    return low <= _release(version or installed_diffusers_version()) < high


def require_supported_diffusers(feature: str) -> None:
    """Raise UnsupportedDiffusersVersion naming the feature, the range and the installed version."""
    version = installed_diffusers_version()
    if not diffusers_version_supported(version):
        raise UnsupportedDiffusersVersion(
            f"{feature}: expected diffusers {supported_range_text()} (the versions mfa_hf is tested "
            f"against), got diffusers {version}. The MFA processors (MFAProcessor, MFAJointAttnProcessor, "
            f"MFACogVideoXAttnProcessor) do not depend on this check; the 'mfa' dispatcher backend does."
        )
