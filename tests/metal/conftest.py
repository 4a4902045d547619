"""Fixtures for the metal backend's tests: one file runs on a Mac's mps device and, elsewhere,
on CPU tensors through the MSL emulator (MFA_METAL_EMULATOR=1)."""

import os
import zlib

import pytest
import torch

from mfa_hf.kernels.metal.emulator.pytest_fixtures import emulator  # noqa: F401
from mfa_hf.kernels.metal.emulator.pytest_fixtures import metal as metal_runtime  # noqa: F401
from mfa_hf.kernels.metal.emulator.targets import emulate

# Every test here runs twice: with IEEE math, and as compiled with fast math (PYTORCH_MPS_FAST_MATH=1,
# under which Apple's compiler may assume no inf or NaN; the emulator compiles with clang's
# -ffinite-math-only). The default run keeps the fast-math twin of one test in FAST_MATH_SAMPLE
# (chosen by a hash of its id, so the choice is stable; MFA_FAST_MATH_SAMPLE=1 keeps them all) and
# of every test marked `finite_math`; --run-slow runs them all, with the slow matrices.
MATH_MODES = ("ieee", "fast")
FAST_MATH_SAMPLE = int(os.environ.get("MFA_FAST_MATH_SAMPLE", "6"))


@pytest.fixture(params=MATH_MODES)
def math_mode(request, metal_runtime):  # noqa: F811
    """Compile the kernels of this test with IEEE math or with fast math. Under the emulator the mode
    is switched per test; torch reads PYTORCH_MPS_FAST_MATH once per process, so on a Mac the suite
    runs the mode its environment chose and skips the other."""
    fast = request.param == "fast"
    if not metal_runtime.is_emulated:
        process_fast = os.environ.get("PYTORCH_MPS_FAST_MATH", "0") != "0"
        if fast != process_fast:
            pytest.skip(f"torch compiled this process's shaders with{'' if process_fast else 'out'} fast math "
                        "(PYTORCH_MPS_FAST_MATH is read once per process): run the suite again with it "
                        f"{'unset' if process_fast else '=1'} for this mode")
        yield request.param
        return
    with emulate(fast_math=fast):
        yield request.param


@pytest.fixture
def metal(metal_runtime, math_mode):  # noqa: F811
    """The runtime (real mps or the emulator), with the test's math mode in force."""
    return metal_runtime


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark the fast-math twins outside the sample slow (the root conftest deselects slow tests)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or callspec.params.get("math_mode") != "fast" or "finite_math" in item.keywords:
            continue
        twin = item.nodeid.replace("-fast]", "]").replace("[fast]", "")
        if zlib.crc32(twin.encode()) % FAST_MATH_SAMPLE:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def metal_backend(metal, monkeypatch):  # noqa: F811
    """Forces the metal backend (a refusal raises with its reason) on the runtime's device."""
    if metal.is_emulated:
        monkeypatch.setenv("MFA_METAL_EMULATOR", "1")
    monkeypatch.setenv("MFA_BACKEND", "metal")
    return metal


class TwoSchedules:
    """Runs a call under the emulator's `forward` schedule, then under `sg-random`, and asserts
    bitwise-equal tensors (outputs are poisoned before each run). On real Metal the second run
    must agree bitwise too: the kernel is deterministic."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        monkeypatch.setenv("MSLEMU_SCHEDULE", "forward")

    def __call__(self, call):
        first = call()
        self.again(call, first)
        return first

    def again(self, call, first):
        """Repeat `call` (which returned `first` under the forward schedule) under sg-random."""
        self.monkeypatch.setenv("MSLEMU_SCHEDULE", "sg-random")
        try:
            second = call()
        finally:
            self.monkeypatch.setenv("MSLEMU_SCHEDULE", "forward")
        for n, (a, b) in enumerate(zip(first, second, strict=True)):
            a, b = a.detach().cpu(), b.detach().cpu()
            if not torch.equal(bits(a), bits(b)):
                differ = int((bits(a) != bits(b)).sum())
                raise AssertionError(f"output {n} differs between schedules in {differ} of {a.numel()} elements")


@pytest.fixture
def two_schedules(metal_backend, monkeypatch):
    return TwoSchedules(monkeypatch)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (so that NaN == NaN and -0 != 0)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.fixture
def no_native_routes(monkeypatch, tmp_path):
    """Auto selection among our backends only: a route table with no native kernel for cpu (the emulator's
    tensors) or mps, so these tests see the metal kernels serve what the router would send to SDPA."""
    from mfa_hf import native_table

    path = tmp_path / "no_native_routes.json"
    native_table.write(path, {"cpu": (), "mps": ()})
    monkeypatch.setenv("MFA_ROUTE_TABLE", str(path))
