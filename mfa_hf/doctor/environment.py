"""Where the doctor runs: the Metal runtime (real mps, or the MSL emulator when there is none) and
the facts a bug report needs (chip, macOS, versions, MSL version, fast math)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata

import torch

FAST_MATH_ENV = "PYTORCH_MPS_FAST_MATH"
EMULATOR_ENV = "MFA_METAL_EMULATOR"


class RuntimeUnavailable(RuntimeError):
    """No Metal runtime here (no mps device, and no clang for the emulator): the message says what to install."""


@dataclass(frozen=True)
class Runtime:
    device: str  # where kernel arguments live: "mps", or "cpu" under the emulator
    emulated: bool
    note: str


def fast_math_on() -> bool:
    """torch's rule: PYTORCH_MPS_FAST_MATH set to anything but "0"."""
    value = os.environ.get(FAST_MATH_ENV)
    return value is not None and value != "0"


def mode_name(fast_math: bool) -> str:
    return "fast-math" if fast_math else "safe"


def choose_runtime() -> Runtime:
    """Real Metal when torch has a usable mps device (and MFA_METAL_EMULATOR=1 does not force the
    emulator); else the emulator, which this sets MFA_METAL_EMULATOR=1 for (the caller restores it)."""
    forced = os.environ.get(EMULATOR_ENV) == "1"
    if not forced and torch.backends.mps.is_available():
        return Runtime("mps", False, "real Metal: torch.mps.compile_shader on this Mac's GPU")
    from mfa_hf.kernels.metal.emulator import CompilerNotFound, find_compiler

    try:
        find_compiler()
    except CompilerNotFound as error:
        raise RuntimeUnavailable(f"no mps device here, and the MSL emulator that would stand in for it needs "
                                 f"clang: {error}") from None
    os.environ[EMULATOR_ENV] = "1"
    if forced:
        return Runtime("cpu", True, f"{EMULATOR_ENV}=1 was set, so the MSL emulator runs the kernels on the CPU")
    return Runtime("cpu", True, f"torch reports no mps device, so the doctor set {EMULATOR_ENV}=1 and the MSL "
                                "emulator runs the kernels on the CPU (no Apple GPU was tested)")


def facts(runtime: Runtime) -> dict:
    macos = platform.mac_ver()[0]
    return {
        "chip": chip_name(),
        "macos": macos or "not macOS",
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {name: package_version(dist) for name, dist in
                     (("torch", "torch"), ("transformers", "transformers"), ("diffusers", "diffusers"),
                      ("mfa_hf", "mfa-hf"))},
        "msl_version": msl_version(macos, runtime.emulated),
        "fast_math": fast_math_on(),
        "emulated": runtime.emulated,
        "device": runtime.device,
        "runtime": runtime.note,
        "compiler": compiler_banner() if runtime.emulated else "Apple's Metal compiler (through torch)",
    }


def chip_name() -> str:
    if sys.platform == "darwin":
        try:
            name = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
            if name:
                return name
        except (OSError, subprocess.SubprocessError):
            pass
    return _cpu_model() or platform.processor() or platform.machine() or "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def package_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def msl_version(macos: str, emulated: bool) -> str:
    """The MSL version torch compiles with, from the emulator's rule table when it has one."""
    try:
        from mfa_hf.kernels.metal.emulator import targets
    except ImportError:
        return "unknown"
    try:
        if emulated and hasattr(targets, "current_target"):
            return f"{targets.current_target().msl_version} (emulated target: {targets.current_target().describe()})"
        if macos:
            return targets.msl_version_for(macos, torch.__version__)
    except Exception as error:  # a rule that cannot answer must not stop the report
        return f"unknown ({error})"
    return "unknown"


def compiler_banner() -> str:
    try:
        from mfa_hf.kernels.metal.emulator import find_compiler

        return find_compiler()[1].splitlines()[0]
    except Exception as error:
        return f"unknown ({error})"
