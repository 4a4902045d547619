"""Reading environment variables on a hot path: os.environ's own store, as a plain dict read.

`os.environ.get(name)` encodes the name and decodes the value on every call (1-2 µs each on the
machines measured); a call that reads four variables to key a memo pays more for that than for
the lookup. `reader(*names)` returns a function giving the variables' current values as
os.environ stores them (bytes on POSIX): equal exactly when the decoded values are equal, so they
serve as keys and in comparisons with `raw(...)`. os.environ's store is what `os.environ[...] = `,
`del`, `pytest`'s monkeypatch and `os.environ.update` write, so the values are never stale. A
Python without that store (an alternative implementation) gets `os.environ.get` instead.

Imports only the standard library: every module may import it.
"""

from __future__ import annotations

import os
from typing import Callable, Optional


def _store() -> Optional[dict]:
    store = getattr(os.environ, "_data", None)
    return store if isinstance(store, dict) else None


def _encoded(name: str):
    try:
        return os.environ.encodekey(name)
    except AttributeError:
        return None


def raw(value: Optional[str]):
    """`value` as the reader returns it (None stays None): for comparisons with a reader's values."""
    if value is None or _store() is None:
        return value
    try:
        return os.environ.encodevalue(value)
    except AttributeError:
        return value


def reader(*names: str) -> Callable[[], tuple]:
    """A function returning the current values of `names`, as stored (see the module docstring)."""
    keys = tuple(_encoded(name) for name in names)
    if any(key is None for key in keys):
        return lambda: tuple(os.environ.get(name) for name in names)

    def read() -> tuple:
        store = _store()
        if store is None:
            return tuple(os.environ.get(name) for name in names)
        return tuple([store.get(key) for key in keys])

    return read


def is_on(value) -> bool:
    """Whether a stored value (from a reader) turns a flag on: set, and neither empty nor "0"."""
    return value is not None and value not in _OFF


_OFF = frozenset(("", "0", b"", b"0"))
