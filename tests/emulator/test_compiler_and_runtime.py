"""Compiler discovery and cache, runtime selection, and the environment switches."""

import subprocess
import sys
import time

import pytest
import torch

from mfa_hf.kernels.metal.emulator import (CompilerNotFound, KernelSourceError, compiler, emulator_enabled,
                                           metal_runtime)

SRC = r"""
#include <metal_stdlib>
using namespace metal;
kernel void add_one(device float* x, uint i [[thread_position_in_grid]]) { x[i] += 1.0f; }
"""


def test_cache_hit_reuses_the_library_without_compiling(emulator, tmp_path, monkeypatch):
    """A hit is the stored library, with no compiler run (checked by count, not by a time a loaded host can miss)."""
    monkeypatch.setenv("MSLEMU_CACHE", str(tmp_path))
    source = SRC + f"// unique {time.time_ns()}\n"
    first, _ = compiler.build(source)

    def no_compile(*args, **kwargs):
        raise AssertionError("a cache hit ran the compiler")

    monkeypatch.setattr(compiler, "_compile", no_compile)
    second, kernels = compiler.build(source)
    assert first == second and [k.name for k in kernels] == ["add_one"]
    assert not list(tmp_path.glob(".tmp-*")), "temporary files must be renamed into place"


def test_missing_compiler_says_how_to_install(monkeypatch):
    monkeypatch.setenv("MSLEMU_CXX", "/nonexistent/clang++")
    compiler.find_compiler.cache_clear()
    try:
        with pytest.raises(CompilerNotFound, match=r"apt-get install -y clang-19.*ziglang"):
            compiler.find_compiler()
    finally:
        monkeypatch.delenv("MSLEMU_CXX")
        compiler.find_compiler.cache_clear()


def test_unsupported_kernel_forms_are_reported(emulator):
    src = SRC.replace("uint i [[thread_position_in_grid]]", "threadgroup float* t [[threadgroup(0)]]")
    with pytest.raises(KernelSourceError, match=r"threadgroup memory passed as a kernel argument is not supported"):
        emulator.compile_shader(src)


def test_emulator_switch(monkeypatch):
    monkeypatch.setenv("MFA_METAL_EMULATOR", "1")
    assert emulator_enabled()
    runtime = metal_runtime()
    assert runtime.is_emulated and runtime.device == "cpu"
    monkeypatch.setenv("MFA_METAL_EMULATOR", "0")
    assert not emulator_enabled()


def test_runtime_without_mps_is_the_emulator(metal):
    if torch.backends.mps.is_available():
        assert metal.device == "mps" and not metal.is_emulated
    else:
        assert metal.device == "cpu" and metal.is_emulated
    x = metal.tensor(torch.zeros(5))
    metal.compile_shader(SRC).add_one(x)
    assert x.cpu().tolist() == [1.0] * 5


def test_workers_setting_is_validated(emulator, monkeypatch):
    lib = emulator.compile_shader(SRC)
    monkeypatch.setenv("MSLEMU_WORKERS", "zero")
    with pytest.raises(ValueError, match="MSLEMU_WORKERS: expected a positive integer, got 'zero'"):
        lib.add_one(torch.zeros(4))


def test_works_in_a_fresh_process_with_one_worker(emulator):
    """The cached library loads in another process (as parallel test workers do)."""
    code = (
        "import torch; from mfa_hf.kernels.metal.emulator import compile_shader\n"
        f"x = torch.zeros(3000); compile_shader({SRC!r}).add_one(x, group_size=64); assert (x == 1).all()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**__import__("os").environ, "MSLEMU_WORKERS": "1"})
