"""MFA_TRACE: which backend served which problems, and how often.

Kernel calls are counted inside the custom ops' real implementations, so they are right under
torch.compile too (the compiled graph still calls the op); routing decisions and fallbacks, made while
tracing, are not counted there (_tally), nor the platform's kernel that a compiled graph calls on a
native route. Tests use `capture()` to assert a kernel really ran. Calls are counted while MFA_TRACE
is set or a capture is open (`enabled()`), not otherwise.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch

from .kernels.environment import is_on, reader

_read_trace = reader("MFA_TRACE")  # checked on every call: a dict read, not os.environ.get
TraceKey = tuple  # (backend, op, dtype, head_dim, lq, lk, flags)

_counts: Counter = Counter()
_captures: list[Counter] = []
# Calls handed on, {(source, reason): n}: by an opt-in patch (integrations/sdpa_patch.py) back to the stock
# function, or by a backend whose kernel cannot be built or launched here to the next one ("metal -> torch").
_fallbacks: Counter = Counter()
_fallback_captures: list[Counter] = []
# Routing decisions, {(path, reason): n}: "native" paths (the platform's fused kernel, mfa_hf/routes.py) or
# "ours" with the reason the native kernel could not serve the call exactly.
_routes: Counter = Counter()
_route_captures: list[Counter] = []


def enabled() -> bool:
    """Whether calls are being counted: MFA_TRACE is set or a capture is open. Callers check this
    before building a record, so an untraced call pays nothing for it. Never while compiling (nothing is
    counted there, _tally): dynamo guarded on the captures it read, so opening or closing one recompiled."""
    if torch.compiler.is_compiling():
        return False
    return bool(_captures or _route_captures) or is_on(_read_trace()[0])


def record(backend: str, op: str, dtype, head_dim: int, lq: int, lk: int, flags: str) -> None:
    _tally(_counts, _captures, (backend, op, str(dtype).replace("torch.", ""), head_dim, lq, lk, flags))


def capture():
    """Count the calls made inside the block: {(backend, op, dtype, D, Lq, Lk, flags): n}."""
    return _capturing(_captures)


def _tally(total: Counter, captures: list[Counter], key) -> None:
    """Count `key` in `total` and the open captures; not while compiling. A decision made while
    tracing (a native route, a fallback) would count once per trace, not per call, and dynamo guarded on the
    counter it changed, so that each counted call recompiled the graph (a traced, compiled generate recompiled every
    step). A compiled graph's calls of our ops are counted in the ops' implementations, which it runs."""
    if torch.compiler.is_compiling():
        return
    total[key] += 1
    for captured in captures:
        captured[key] += 1


@contextmanager
def _capturing(captures: list[Counter]) -> Iterator[Counter]:
    captured: Counter = Counter()
    captures.append(captured)
    try:
        yield captured
    finally:
        del captures[next(i for i, c in enumerate(captures) if c is captured)]  # by identity: equal counts compare equal


def record_fallback(source: str, reason: str) -> None:
    """Count a call that `source` did not serve and handed on, with the reason."""
    _tally(_fallbacks, _fallback_captures, (source, reason))


def capture_fallbacks():
    """Count the fallbacks recorded inside the block: {(source, reason): n}."""
    return _capturing(_fallback_captures)


def record_route(path: str, reason: str) -> None:
    """Count a routing decision: the native path that served a call, or "ours" and why not native."""
    _tally(_routes, _route_captures, (path, reason))


def capture_routes():
    """Count the routing decisions inside the block: {(path, reason): n}."""
    return _capturing(_route_captures)


def routes_report(counts: Counter | None = None) -> str:
    return _reasons_report("mfa_hf trace: routing (native = the platform's fused kernel, exact here; ours = why not)",
                           "path", _routes if counts is None else counts)


def fallback_report(counts: Counter | None = None) -> str:
    return _reasons_report("mfa_hf trace: calls handed on (to the stock function, or from a kernel unavailable here "
                           "to another backend)", "source", _fallbacks if counts is None else counts)


def _reasons_report(title: str, what: str, counts: Counter) -> str:
    """{(what, reason): n} as lines, the most frequent first."""
    lines = [title, f"{'calls':>7}  {what}: reason"]
    for (name, reason), n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        lines.append(f"{n:>7}  {name}: {reason}")
    return "\n".join(lines)


def served_by(captured: Counter) -> Counter:
    """Collapse a capture to {(backend, op): calls}."""
    totals: Counter = Counter()
    for key, n in captured.items():
        totals[key[0], key[1]] += n
    return totals


def report(counts: Counter | None = None) -> str:
    counts = _counts if counts is None else counts
    header = f"{'backend':8} {'op':8} {'dtype':9} {'D':>4} {'Lq':>7} {'Lk':>7} {'calls':>7}  flags"
    lines = ["mfa_hf trace: calls served per backend", header]
    for (backend, op, dtype, dim, lq, lk, flags), n in sorted(counts.items(), key=str):
        lines.append(f"{backend:8} {op:8} {dtype:9} {dim:>4} {lq:>7} {lk:>7} {n:>7}  {flags}")
    return "\n".join(lines)


def _report_at_exit() -> None:
    if os.environ.get("MFA_TRACE", "0") in ("", "0"):
        return
    if _counts:
        print(report(), file=sys.stderr)
    if _fallbacks:
        print(fallback_report(), file=sys.stderr)
    if _routes:
        print(routes_report(), file=sys.stderr)


atexit.register(_report_at_exit)
