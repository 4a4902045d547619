"""pytest fixtures for Metal kernel tests, shared by every test folder:

    # conftest.py
    from mfa_hf.kernels.metal.emulator.pytest_fixtures import metal, emulator  # noqa: F401

`metal` is the runtime the test should use (real MPS on a Mac, the emulator elsewhere);
`emulator` is always the emulator (for tests of emulator-only behaviour such as schedules).
A missing compiler is an error with install instructions, never a skip: CI must install clang.
"""

from __future__ import annotations

import pytest

from .compiler import find_compiler
from .runtime_select import MetalRuntime, metal_runtime


@pytest.fixture(scope="session")
def metal() -> MetalRuntime:
    runtime = metal_runtime()
    if runtime.is_emulated:
        find_compiler()  # raises CompilerNotFound with the install instructions
    return runtime


@pytest.fixture(scope="session")
def emulator() -> MetalRuntime:
    from .library import compile_shader

    find_compiler()
    return MetalRuntime(compile_shader, "cpu", True)
