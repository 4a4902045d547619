"""Repository-wide pytest options: `--run-slow` (or MFA_SLOW=1) runs the full matrices.

Also keeps the repository's kernels/ folder (installed as mfa_hf.kernels) from shadowing PyPI's `kernels`
package, which transformers >= 5.25 installs and imports: pytest puts the repository root on sys.path,
where `import kernels` would find our folder ("cannot import name 'CUDAProperties' from 'kernels'").
The real package is imported first without the root on the path (then it is cached), and Pythons the
tests start leave their working directory off sys.path (PYTHONSAFEPATH).
"""

import importlib
import os
import sys
from pathlib import Path

import pytest


def _import_installed_kernels() -> None:
    root = Path(__file__).resolve().parent
    loaded = sys.modules.get("kernels")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent == root / "kernels":
        del sys.modules["kernels"]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != root]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass  # not installed: nothing to shadow
    finally:
        sys.path[:] = saved


_import_installed_kernels()
os.environ.setdefault("PYTHONSAFEPATH", "1")
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
