"""Which diffusers releases mfa_hf was tested against, and what it says on the others.

No version number gates anything (DESIGN.md, "Living with fast-moving dependencies"): diffusers
releases monthly and a fresh install gets the newest. The processors use documented attributes of
`Attention` only and always work. The private tier (the "mfa" dispatcher backend and the set-time
checks, internals.py) is turned on by a probe of the exact contract it touches; this file holds the
probe's outcome and its words: one RuntimeWarning for a release outside TESTED_DIFFUSERS or a failed
probe, and the error the private features raise when the probe failed.
"""

from __future__ import annotations

from dataclasses import dataclass

# Release series run through model_tests/diffusers (0.42.1). Add one after running that suite on it.
TESTED_DIFFUSERS = ("0.42",)

ALTERNATIVES = ("the MFA processors, set through set_attn_processor (MFAProcessor, MFAJointAttnProcessor, "
                "MFACogVideoXAttnProcessor), do not depend on diffusers' internals and keep working; "
                "for dispatcher models (Flux, Wan, LTX, QwenImage, ...) use diffusers' backend 'native'")


class UnsupportedDiffusersInternals(RuntimeError):
    """The installed diffusers failed the probe of the private contract internals.py relies on."""


# The name before the probe replaced the version range (2026-12); `except UnsupportedDiffusersVersion`
# in callers keeps catching the same error.
UnsupportedDiffusersVersion = UnsupportedDiffusersInternals


def installed_diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def is_tested(version: str) -> bool:
    return any(version == series or version.startswith(series + ".") for series in TESTED_DIFFUSERS)


def tested_text() -> str:
    return ", ".join(f"{series}.x" for series in TESTED_DIFFUSERS)


@dataclass(frozen=True)
class ProbeResult:
    """What internals.probe() found: `failed` names the first check that did not hold, None if all did."""

    version: str
    failed: str | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.failed is None

    @property
    def tested(self) -> bool:
        return is_tested(self.version)

    def warning(self) -> str | None:
        """The one warning this outcome earns: None for a tested release that passed the probe."""
        if self.ok and self.tested:
            return None
        if self.ok:
            return (f"mfa_hf: diffusers {self.version} is not a release mfa_hf was tested against (tested: "
                    f"{tested_text()}). The probe of the diffusers internals it uses passed, so the 'mfa' "
                    f"attention backend and the set-time processor checks are on.")
        which = "a tested release" if self.tested else f"not a tested release; tested: {tested_text()}"
        return (f"mfa_hf: diffusers {self.version} ({which}) failed the probe '{self.failed}': {self.reason}. "
                f"The 'mfa' attention backend and the set-time processor checks are off; {ALTERNATIVES}.")

    def error(self, feature: str) -> UnsupportedDiffusersInternals:
        return UnsupportedDiffusersInternals(
            f"{feature}: expected diffusers internals that pass mfa_hf's probe, got diffusers {self.version} "
            f"failing the probe '{self.failed}': {self.reason}. Instead: {ALTERNATIVES}.")
