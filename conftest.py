"""Repository-wide pytest options: `--run-slow` (or MFA_SLOW=1) runs the full matrices.

The repository's kernels/ folder on sys.path (pytest puts the root there) hands a top-level `import kernels`
to PyPI's package itself (kernels/__init__.py).
"""

import os

import pytest

# Inductor's on-disk caches key a compiled graph by the traced graph, which names torch.ops.mfa.flash_attention
# but not the Python source of its CompositeImplicitAutograd kernel (mfa_hf/custom_op_alias.py): a cache warmed
# by an older checkout replays the old decomposition. Tests compile fresh (set before torch reads its config).
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")


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
