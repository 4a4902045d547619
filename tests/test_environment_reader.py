"""kernels/environment.py: a reader's values follow every way os.environ is written, and compare like the decoded
values (the memo keys and switches built on them must never be stale)."""

from __future__ import annotations

import os

import pytest

from mfa_hf.kernels.environment import is_on, raw, reader

NAMES = ("MFA_TEST_READER_A", "MFA_TEST_READER_B")


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)


def _decoded(values):
    return tuple(None if v is None else (v.decode() if isinstance(v, bytes) else v) for v in values)


def test_values_follow_every_write(monkeypatch):
    read = reader(*NAMES)
    assert read() == (None, None)
    monkeypatch.setenv(NAMES[0], "1")
    assert _decoded(read()) == ("1", None) and read()[0] == raw("1")
    os.environ[NAMES[1]] = "é x"
    assert _decoded(read()) == ("1", "é x")
    os.environ.update({NAMES[0]: "0"})
    assert read()[0] == raw("0") != raw("1")
    del os.environ[NAMES[1]]
    os.environ.pop(NAMES[0])
    assert read() == (None, None)


@pytest.mark.parametrize("value, on", [(None, False), ("", False), ("0", False), ("1", True), ("yes", True)])
def test_flags(monkeypatch, value, on):
    if value is not None:
        monkeypatch.setenv(NAMES[0], value)
    assert is_on(reader(NAMES[0])()[0]) is on
