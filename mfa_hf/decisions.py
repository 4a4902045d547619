"""Decisions made once per kind of call (checks, route, backend), kept under a key of what decides them.

A key holds only metadata: dtypes, shapes, strides, devices, plain Python options and the environment
variables that steer dispatch; never a tensor and never a value read from one. Validation, routing and
backend selection are pure functions of that metadata, so a call whose key is known skips them and
only builds its call and launches (the host cost of a decode layer or of a model's repeated attention
calls). Bounded: cleared when full (a long generation adds a kind per cache length).
"""

from __future__ import annotations

from .kernels.environment import reader
from .kernels.launch import BoundedMemo

KEPT = 1024


class Decisions(BoundedMemo):
    """key -> decision; `keep` stores one, clearing the memo first when it holds KEPT."""

    @property
    def limit(self) -> int:
        return KEPT


steering_environment = reader("MFA_BACKEND", "MFA_ROUTE_TABLE")
"""() -> the environment variables that change a decision, as stored (a memo key): the forced backend and the
native-route table."""
