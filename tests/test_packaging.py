"""The package layout: every folder with an __init__.py ships, and a built wheel imports every module."""

import pathlib
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAPPING = {"mfa_hf": ROOT / "mfa_hf", "mfa_hf.kernels": ROOT / "kernels", "mfa_hf.integrations": ROOT / "integrations"}

IMPORT_ALL = r"""
import importlib, importlib.util, pkgutil, sys, mfa_hf
assert mfa_hf.__file__.startswith(sys.argv[1]), mfa_hf.__file__
names = [m.name for m in pkgutil.walk_packages(mfa_hf.__path__, "mfa_hf.") if not m.name.endswith("__main__")]
has_triton = importlib.util.find_spec("triton") is not None
for name in names:
    if name.startswith("mfa_hf.kernels.triton.") and not has_triton:
        # Where triton cannot be installed (macOS), its kernel modules must fail to import with a
        # clear reason, and the backend must report itself unavailable rather than break mfa_hf.
        try:
            importlib.import_module(name)
        except ImportError as error:
            assert "triton" in str(error), (name, error)
            continue
    module = importlib.import_module(name)
    assert module.__file__.startswith(sys.argv[1]), (name, module.__file__)
if not has_triton:
    assert not mfa_hf.dispatch.backend("triton").supports(None)[0]
print(len(names))
"""


def source_packages() -> set[str]:
    found = set()
    for prefix, folder in MAPPING.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder)
            found.add(".".join([prefix, *relative.parts]))
    return found


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert source_packages() == listed


def test_built_wheel_imports_every_module(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(ROOT)], check=True, timeout=600)
    (wheel,) = (tmp_path / "wheel").glob("mfa_hf-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=600)
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL, str(target)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) >= 20


def _python_in_checkout(code: str) -> subprocess.CompletedProcess:
    """`python -c code` started in the repository root, the root on sys.path (as a user's shell gives it)."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONSAFEPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _installed_kernels() -> bool:
    import importlib.machinery

    elsewhere = [p for p in sys.path if pathlib.Path(p or ".").resolve() != ROOT.resolve()]
    return importlib.machinery.PathFinder.find_spec("kernels", elsewhere) is not None


@pytest.mark.skipif(not _installed_kernels(), reason="PyPI's kernels is not installed: nothing to shadow")
def test_transformers_imports_from_a_checkout_root():
    """The checkout's kernels/ folder, on sys.path as a top-level `kernels`, hands that import to PyPI's kernels
    (transformers >= 5.25 imports it: 'cannot import name CUDAProperties from kernels' before), while
    mfa_hf.kernels stays the kernel core."""
    done = _python_in_checkout(
        "import kernels, transformers.modeling_utils, mfa_hf.kernels.reference as r; "
        "print(kernels.__file__); print(r.__name__)")
    assert done.returncode == 0, done.stderr[-2000:]
    found, core = done.stdout.split()
    assert pathlib.Path(found).resolve().parent != ROOT / "kernels" and core == "mfa_hf.kernels.reference"


def test_without_pypi_kernels_the_folder_imports_as_nothing():
    """Where no other `kernels` exists, `import kernels` from a checkout fails as a missing module (what
    transformers' availability checks expect), naming the folder's real import."""
    done = _python_in_checkout(
        "import sys; sys.path[:] = [p for p in sys.path if 'packages' not in p]\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print(e.name, '|', e)\n"
        "print('kernels' in sys.modules)")
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.strip().splitlines()
    assert first.startswith("kernels |") and "mfa_hf.kernels" in first and second == "False"


def test_lazily_imported_names_are_listed_and_resolve():
    """dir(mfa_hf) (tab completion) lists the names imported on first use, and each of them resolves."""
    import mfa_hf

    names = set(dir(mfa_hf))
    for name in mfa_hf._LAZY_EXPORTS:
        assert name in names, name
        assert getattr(mfa_hf, name) is not None, name
    assert {"flash_attn_func", "MFAQuantizedCache", "MFAProcessor"} <= names
