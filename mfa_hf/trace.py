"""MFA_TRACE: which backend served which problems, and how often.

Counting happens inside the custom ops' real implementations, so it is right under torch.compile
too (the compiled graph still calls the op). Tests use `capture()` to assert a kernel really ran.
Calls are counted while MFA_TRACE is set or a capture is open (`enabled()`), not otherwise.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

TraceKey = tuple  # (backend, op, dtype, head_dim, lq, lk, flags)

_counts: Counter = Counter()
_captures: list[Counter] = []
# Calls handed on, {(source, reason): n}: by an opt-in patch (integrations/sdpa_patch.py) back to the stock
# function, or by a backend whose kernel cannot be built or launched here to the next one ("metal -> torch").
_fallbacks: Counter = Counter()
_fallback_captures: list[Counter] = []


def enabled() -> bool:
    """Whether calls are being counted: MFA_TRACE is set or a capture() is open. Callers check this
    before building a record, so an untraced call pays nothing for it."""
    return bool(_captures) or os.environ.get("MFA_TRACE", "0") not in ("", "0")


def record(backend: str, op: str, dtype, head_dim: int, lq: int, lk: int, flags: str) -> None:
    key = (backend, op, str(dtype).replace("torch.", ""), head_dim, lq, lk, flags)
    _counts[key] += 1
    for captured in _captures:
        captured[key] += 1


@contextmanager
def capture() -> Iterator[Counter]:
    """Count the calls made inside the block: {(backend, op, dtype, D, Lq, Lk, flags): n}."""
    captured: Counter = Counter()
    _captures.append(captured)
    try:
        yield captured
    finally:
        # By identity: two captures with equal counts compare equal, and list.remove would take the
        # first of them, not this one.
        del _captures[next(i for i, c in enumerate(_captures) if c is captured)]


def record_fallback(source: str, reason: str) -> None:
    """Count a call that `source` did not serve and handed on, with the reason."""
    _fallbacks[source, reason] += 1
    for captured in _fallback_captures:
        captured[source, reason] += 1


@contextmanager
def capture_fallbacks() -> Iterator[Counter]:
    """Count the fallbacks recorded inside the block: {(source, reason): n}."""
    captured: Counter = Counter()
    _fallback_captures.append(captured)
    try:
        yield captured
    finally:
        del _fallback_captures[next(i for i, c in enumerate(_fallback_captures) if c is captured)]


def fallback_report(counts: Counter | None = None) -> str:
    counts = _fallbacks if counts is None else counts
    lines = ["mfa_hf trace: calls handed on (to the stock function, or from a kernel unavailable here to another backend)",
             f"{'calls':>7}  source: reason"]
    for (source, reason), n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        lines.append(f"{n:>7}  {source}: {reason}")
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


atexit.register(_report_at_exit)
