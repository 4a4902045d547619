"""Which transformers releases the integration was tested against, and the refusal for others.

The `mps_flash` provider hook touches transformers internals (see provider.py), so it is gated on
the releases we ran the conformance suite with: 5.17 (the GPU machine) and 5.23 (newest on PyPI).
Patch releases of those minors are accepted.
"""

from __future__ import annotations

TESTED_TRANSFORMERS = ("5.17", "5.23")
"""(major.minor) releases the whole model_tests/transformers suite passed on."""

# Minors between the tested ones share the internals we touch (checked by reading 5.17 and 5.23);
# anything outside [min, max] is refused.
_MIN, _MAX = (5, 17), (5, 23)


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_transformers_version(version: str | None = None) -> str:
    """Return the installed version; raise RuntimeError naming it when it is outside the tested range."""
    if version is None:
        import transformers

        version = transformers.__version__
    if not _MIN <= _minor(version) <= _MAX:
        raise RuntimeError(
            f"mfa_hf.integrations.transformers: transformers {version} is not supported; tested with "
            f"{', '.join(TESTED_TRANSFORMERS)} (any 5.{_MIN[1]}..5.{_MAX[1]} release is accepted). "
            "Install one of those, e.g. `pip install 'transformers>=5.17,<5.24'`, or use "
            'attn_implementation="sdpa".'
        )
    return version
