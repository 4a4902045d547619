"""Backend registration and selection: ask each backend `supports(problem)` in priority order.

REGISTRY is the one list of backends: a new backend is its folder (kernels/<name>/, exposing a
`BACKEND` object that implements kernels/contract.py's `Backend`) plus one line here.
MFA_BACKEND=auto|metal|triton|torch forces one; forcing a backend that cannot serve the problem
raises with its reason instead of silently falling back to another semantics or speed.

Before any of ours, `route` asks routes.py whether the platform's own fused kernel computes exactly
this call (auto only; MFA_BACKEND=native forces that path, any backend name turns routing off).
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass

from . import ops, routes, trace
from .kernels.contract import Backend as BackendContract
from .problem import AttentionProblem

# (name, module exposing BACKEND), in priority order.
REGISTRY = (
    ("metal", "mfa_hf.kernels.metal.backend"),
    ("triton", "mfa_hf.kernels.triton.backend"),
    ("torch", "mfa_hf.kernels.torch.backend"),
)
PRIORITY = tuple(name for name, _ in REGISTRY)
_MODULES = dict(REGISTRY)


class BackendUnavailable(RuntimeError):
    """A forced backend cannot serve the problem (the message says why)."""


@dataclass(frozen=True)
class Backend:
    """A registered backend: its implementation and its custom ops, or why it could not be loaded."""

    name: str
    impl: BackendContract | None
    ops: ops.BackendOps | None = None
    load_error: str = ""

    def supports(self, problem: AttentionProblem) -> tuple[bool, str]:
        if self.impl is None:
            return False, self.load_error
        return self.impl.supports(problem)


_loaded: dict[str, Backend] = {}
_lock = threading.RLock()  # loading registers custom ops: once per backend, also under threads


def backend(name: str) -> Backend:
    if name not in _MODULES:
        raise ValueError(f"MFA_BACKEND: expected one of auto, native, {', '.join(PRIORITY)}, got {name!r}")
    found = _loaded.get(name)
    if found is None:
        with _lock:
            found = _loaded.get(name) or _load(name)
            _loaded[name] = found
    return found


def _load(name: str) -> Backend:
    try:
        impl = importlib.import_module(_MODULES[name]).BACKEND
    except ImportError as error:
        return Backend(name, None, load_error=f"{name} backend is not available: {error}")
    if not isinstance(impl, BackendContract) or impl.name != name:
        raise TypeError(f"{_MODULES[name]}.BACKEND: expected a Backend named {name!r} (kernels/contract.py), "
                        f"got {impl!r}")
    return Backend(name, impl, ops.define_ops(impl, _implementation))


def _implementation(name: str) -> BackendContract:
    """Another backend's implementation (a fallback); it must load."""
    loaded = backend(name)
    if loaded.impl is None:
        raise RuntimeError(loaded.load_error)
    return loaded.impl


def load_all() -> None:
    """Import every backend now, so that later selection (also under torch.compile) only reads."""
    for name in PRIORITY:
        backend(name)


def forced_backend() -> str:
    return os.environ.get("MFA_BACKEND", "auto").strip().lower() or "auto"


def route(problem: AttentionProblem, **facts) -> routes.Route:
    """Native or ours for this problem: routes.choose under MFA_BACKEND (facts: its keywords)."""
    return routes.choose(problem, forced_backend(), **facts)


def record_route(chosen: routes.Route, problem: AttentionProblem, op: str) -> None:
    """MFA_TRACE: count one call's route (path, reason) and, when native, the call as served by it."""
    trace.record_route(chosen.path, chosen.reason)
    if chosen.native:
        trace.record("native", op, problem.dtype, problem.head_dim_qk, problem.seqlen_q, problem.seqlen_k,
                     f"{problem.flags()} path={chosen.path}")


def select(problem: AttentionProblem) -> Backend:
    forced = forced_backend()
    if forced == "native":
        raise BackendUnavailable("MFA_BACKEND=native: this call has no native path (routes.py); unset MFA_BACKEND to "
                                 "let our kernels serve it")
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
