"""When a backend's kernel cannot be built or launched on this machine, the call goes on.

A Metal kernel that Apple's compiler rejects on one user's macOS (or that fails at launch) must not
break that user's model. The backend raises `KernelUnavailable`; the op wrapper (mfa_hf/ops.py)
then hands the call to the next backend with the same semantics (the torch backend), warns once
per kernel variant, and records the fallback with its reason in the trace. With MFA_BACKEND naming
the failing backend the error is raised instead: a forced backend never silently changes.
"""

from __future__ import annotations

import os
import platform
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

from . import trace


class KernelUnavailable(RuntimeError):
    """A kernel variant could not be compiled or launched here; the message says which and why."""

    def __init__(self, backend: str, variant: str, stage: str, detail: str):
        self.backend, self.variant, self.stage, self.detail = backend, variant, stage, detail
        super().__init__(f"{backend} kernel {variant} failed to {stage} on {platform_description()}: {detail}")

    @property
    def reason(self) -> str:
        """One line for the trace: what failed, without the compiler's whole message."""
        first = self.detail.strip().splitlines()[0] if self.detail.strip() else "no message"
        return f"{self.variant} failed to {self.stage}: {first}"


class KernelFallbackWarning(UserWarning):
    """A kernel failed on this machine and its calls go to another backend (same results, slower)."""


@dataclass(frozen=True)
class Fallback:
    """The backend that serves a call when the first one's kernel is unavailable."""

    name: str
    impl: Callable


def platform_description() -> str:
    import torch

    mac = platform.mac_ver()[0]
    system = f"macOS {mac}" if mac else f"{platform.system()} {platform.release()}"
    return f"{system}, torch {torch.__version__}"


_warned: set = set()
_lock = threading.Lock()


def call(backend: str, impl: Callable, fallback: Fallback | None, args: tuple) -> tuple[object, str]:
    """impl(*args), or fallback.impl(*args) when impl's kernel is unavailable; returns (result, the
    backend that computed it)."""
    try:
        return impl(*args), backend
    except KernelUnavailable as failure:
        forced = os.environ.get("MFA_BACKEND", "auto").strip().lower()
        if fallback is None or forced == backend:
            raise
        _warn_once(failure, fallback.name)
        trace.record_fallback(f"{backend} -> {fallback.name}", failure.reason)
        return fallback.impl(*args), fallback.name


def _warn_once(failure: KernelUnavailable, fallback: str) -> None:
    key = (failure.backend, failure.variant, failure.stage)
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(
        f"mfa_hf: {failure}. Its calls now go to the {fallback} backend (same results, slower). "
        f"Please report this with the output of `mfa-hf doctor`; MFA_BACKEND={failure.backend} makes it an error.",
        KernelFallbackWarning, stacklevel=3)
