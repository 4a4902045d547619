"""The package layout: every folder with an __init__.py ships, and a built wheel imports every module."""

import pathlib
import subprocess
import sys
import tomllib

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
