"""Fixtures for the metal backend's tests: one file runs on a Mac's mps device and, elsewhere,
on CPU tensors through the MSL emulator (MFA_METAL_EMULATOR=1)."""

import pytest
import torch

from mfa_hf.kernels.metal.emulator.pytest_fixtures import emulator, metal  # noqa: F401


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
