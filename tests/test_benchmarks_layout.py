"""Benchmarks, their scripts and their results live in the top-level benchmarks/ folder, which is not
installed: nothing of the kind ships inside the package folders (kernels/, integrations/, mfa_hf/), except
the user-facing `mfa-hf benchmark` command (mfa_hf/benchmark/)."""

import os
import pathlib
import py_compile
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
INSTALLED = ("kernels", "integrations", "mfa_hf")
CLI_PACKAGE = ROOT / "mfa_hf" / "benchmark"  # the documented `mfa-hf benchmark` command stays
SCRIPT_WORDS = ("bench", "repeatab", "overhead", "small_n_check", "full_matrix", "gpu_run")
RESULT_SUFFIXES = (".log", ".log.gz", ".txt", ".sh")
# Found when kernels/triton's benchmarks moved out (issue 18), not moved by that change: each still has
# to go to benchmarks/ (with the references to it). Listed by name so that no new file joins them.
PENDING = {
    "kernels/metal/emulator/bench.py",
    "integrations/flash_attn_shim/fa2_suite/run.sh",
    "integrations/flash_attn_shim/fa2_suite/results-h200-2026-12-03.txt",
}


def installed_files():
    for top in INSTALLED:
        # os.walk does not follow links (a source checkout may link mfa_hf/kernels -> ../kernels).
        for folder, dirs, files in os.walk(ROOT / top):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                yield pathlib.Path(folder) / name


def is_benchmark(path: pathlib.Path) -> bool:
    name = path.name.lower()
    if name.endswith(RESULT_SUFFIXES):
        return True
    if CLI_PACKAGE in path.parents and name.endswith(".py"):
        return False
    return any(word in name for word in SCRIPT_WORDS)


def test_no_benchmark_script_or_result_in_the_installed_folders():
    found = sorted(p.relative_to(ROOT).as_posix() for p in installed_files() if is_benchmark(p))
    assert [p for p in found if p not in PENDING] == [], "move these to benchmarks/ (see benchmarks/README.md)"


def test_benchmarks_is_not_a_package():
    assert (ROOT / "benchmarks").is_dir()
    assert not list((ROOT / "benchmarks").rglob("__init__.py"))
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert not any(p.split(".")[0] == "benchmarks" for p in setuptools["packages"])
    assert not any(folder.split("/")[0] == "benchmarks" for folder in setuptools["package-dir"].values())


@pytest.mark.parametrize("script", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "benchmarks").rglob("*.py")))
def test_benchmark_script_compiles(script, tmp_path):
    py_compile.compile(str(ROOT / script), cfile=str(tmp_path / "script.pyc"), doraise=True)


# CPU benchmark scripts run as the benchmarks README says, at their smallest: a script that stands in for one of our
# functions breaks when that function's signature changes (cpu_native_route.py's did, with a TypeError at its first row).
CPU_SCRIPT_RUNS = {
    "benchmarks/cpu_native_route.py": ["--rounds", "1"],
    "benchmarks/cpu_quant_decode.py": ["--contexts", "256", "--rounds", "1"],
}


@pytest.mark.parametrize("script", sorted(CPU_SCRIPT_RUNS))
def test_cpu_benchmark_script_runs(script):
    import subprocess
    import sys

    # the installed package (a source checkout's root holds kernels/ beside mfa_hf/, not inside it)
    found = subprocess.run([sys.executable, str(ROOT / script), *CPU_SCRIPT_RUNS[script]], cwd=ROOT / "benchmarks",
                           capture_output=True, text=True, timeout=600)
    assert found.returncode == 0, found.stderr[-3000:]
    assert "| 1.00 |" in found.stdout, found.stdout[-2000:]  # the baseline row of its table
