"""Backend selection: ask each backend `supports(problem)` in priority order.

MFA_BACKEND=auto|metal|triton|torch forces one; forcing a backend that cannot serve the problem
raises with its reason instead of silently falling back to another semantics or speed.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from .problem import AttentionProblem

PRIORITY = ("metal", "triton", "torch")
_MODULES = {
    "metal": "mfa_hf.kernels.metal.backend",
    "triton": "mfa_hf.kernels.triton.backend",
    "torch": "mfa_hf.kernels.torch.backend",
}


class BackendUnavailable(RuntimeError):
    """A forced backend cannot serve the problem (the message says why)."""


@dataclass(frozen=True)
class Backend:
    name: str
    module: ModuleType | None
    load_error: str = ""

    def supports(self, problem: AttentionProblem) -> tuple[bool, str]:
        if self.module is None:
            return False, self.load_error
        return self.module.supports(problem)

    def __getattr__(self, item: str) -> Callable:
        # Entry points (OPS, decode, ...) live on the backend module.
        return getattr(self.module, item)


_loaded: dict[str, Backend] = {}


def backend(name: str) -> Backend:
    if name not in _MODULES:
        raise ValueError(f"MFA_BACKEND: expected one of auto, {', '.join(PRIORITY)}, got {name!r}")
    if name not in _loaded:
        try:
            _loaded[name] = Backend(name, importlib.import_module(_MODULES[name]))
        except ImportError as error:
            _loaded[name] = Backend(name, None, f"{name} backend is not available: {error}")
    return _loaded[name]


def load_all() -> None:
    """Import every backend now, so that later selection (also under torch.compile) only reads."""
    for name in PRIORITY:
        backend(name)


def forced_backend() -> str:
    return os.environ.get("MFA_BACKEND", "auto").strip().lower() or "auto"


def select(problem: AttentionProblem) -> Backend:
    forced = forced_backend()
    if forced != "auto":
        chosen = backend(forced)
        ok, reason = chosen.supports(problem)
        if not ok:
            raise BackendUnavailable(f"MFA_BACKEND={forced} cannot serve this call: {reason}")
        return chosen
    reasons = []
    for name in PRIORITY:
        candidate = backend(name)
        ok, reason = candidate.supports(problem)
        if ok:
            return candidate
        reasons.append(f"{name}: {reason}")
    raise BackendUnavailable("no backend can serve this call: " + "; ".join(reasons))
