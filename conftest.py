"""Repository-wide pytest options: `--run-slow` (or MFA_SLOW=1) runs the full matrices."""

import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("MFA_SLOW") == "1":
        return
    # Deselect rather than skip: the full matrices hold thousands of cases.
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]
