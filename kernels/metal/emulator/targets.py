"""Which (macOS, torch) pair is emulated, and what Apple's compiler does for it.

torch.mps.compile_shader compiles the source with `MetalShaderLibrary::compileLibrary`
(aten/src/ATen/native/mps/OperationUtils.mm), which picks the Metal language version from the
running macOS and reads PYTORCH_MPS_FAST_MATH:

- torch >= 2.11 (pytorch#172230, "Compile shaders using latest OS capabilities", merged
  2026-01-12, after the 2.10 branch cut): MSL 4.0 on macOS 26+, 3.2 on macOS 15, else 3.1.
- earlier torch (2.6 private `_compile_shader`, 2.7-2.10 public): MSL 3.1 on macOS 14+, else 3.0
  ("3.0 for atomics, 3.1 introduces bfloat").
- fast math only when PYTORCH_MPS_FAST_MATH is set and not "0"; otherwise safe math
  (MTLMathModeSafe on macOS 15+, fastMathEnabled = NO before). torch reads the variable once per
  process; the emulator reads it at each compile, so tests can switch it.

`msl_version_for` is the rule itself, usable on a real Mac with `platform.mac_ver()[0]` and
`torch.__version__`. The emulated target comes from MSLEMU_MACOS (default 15) and MSLEMU_TORCH
(default: the installed torch), or from `emulate(...)` in tests.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from dataclasses import dataclass
from typing import Iterator

from ...environment import reader

DEFAULT_MACOS = "15"
LATEST_OS_RULE_FROM_TORCH = (2, 11)  # first release with pytorch#172230 (inferred from merge date)
MSL_VERSIONS = ("3.0", "3.1", "3.2", "4.0")


def _major_minor(version: str, what: str) -> tuple[int, int]:
    m = re.match(r"\s*(\d+)(?:\.(\d+))?", str(version))
    if not m:
        raise ValueError(f"{what}: expected a version like '15.4' or '2.8.0', got {version!r}")
    return int(m.group(1)), int(m.group(2) or 0)


def msl_version_for(macos: str, torch_version: str) -> str:
    """The MSL version torch `torch_version` compiles compile_shader sources with on `macos`."""
    os_major, _ = _major_minor(macos, "macos")
    if _major_minor(torch_version, "torch_version") >= LATEST_OS_RULE_FROM_TORCH:
        return "4.0" if os_major >= 26 else "3.2" if os_major >= 15 else "3.1"
    return "3.1" if os_major >= 14 else "3.0"


def bfloat_available(version: str) -> bool:
    """`bfloat` (and `__HAVE_BFLOAT__`) exist from MSL 3.1."""
    return _major_minor(version, "MSL version") >= (3, 1)


def metal_version_macro(version: str) -> int:
    """`__METAL_VERSION__` for an MSL version: 3.1 -> 310."""
    major, minor = _major_minor(version, "MSL version")
    return major * 100 + minor * 10


def fast_math_from_env() -> bool:
    """torch's rule: PYTORCH_MPS_FAST_MATH set to anything but "0"."""
    value = os.environ.get("PYTORCH_MPS_FAST_MATH")
    return value is not None and value != "0"


@dataclass(frozen=True)
class Target:
    macos: str
    torch: str
    fast_math: bool
    counted: bool = False  # a cost-counting build (cost_counters.py); the code computes the same

    @property
    def msl_version(self) -> str:
        return msl_version_for(self.macos, self.torch)

    @property
    def has_bfloat(self) -> bool:
        return bfloat_available(self.msl_version)

    def describe(self) -> str:
        math = "fast math" if self.fast_math else "safe math"
        counted = ", cost counters" if self.counted else ""
        return f"macOS {self.macos} + torch {self.torch}: MSL {self.msl_version}, {math}{counted}"


_OVERRIDE: contextvars.ContextVar[dict] = contextvars.ContextVar("mslemu_target", default={})


def _installed_torch() -> str:
    try:
        import torch

        return torch.__version__
    except ImportError:  # the rule still needs a torch version; assume a current one
        return "2.13"


_TARGETS: dict = {}  # (override, environment) -> Target: launchers ask on every call
# Read on every call: os.environ's own store, not os.environ.get (kernels/environment.py says why).
_environment_key = reader("MSLEMU_MACOS", "MSLEMU_TORCH", "PYTORCH_MPS_FAST_MATH")


def current_target() -> Target:
    """The target compiles use now: `emulate(...)` overrides, else the environment. One Target
    object per (override, environment): launchers may key caches on its identity."""
    override = _OVERRIDE.get()
    key = (tuple(override.items()) if override else (), _environment_key())
    target = _TARGETS.get(key)
    if target is None:
        target = _TARGETS[key] = _target_of(override)
    return target


def _target_of(override: dict) -> Target:
    macos = override.get("macos") or os.environ.get("MSLEMU_MACOS") or DEFAULT_MACOS
    torch_version = override.get("torch") or os.environ.get("MSLEMU_TORCH") or _installed_torch()
    fast_math = override["fast_math"] if override.get("fast_math") is not None else fast_math_from_env()
    target = Target(str(macos), str(torch_version), bool(fast_math), bool(override.get("counted")))
    target.msl_version  # validates both versions here, with the variable's name in the message
    return target


@contextlib.contextmanager
def emulate(macos: str | None = None, torch: str | None = None, fast_math: bool | None = None,
            counted: bool | None = None) -> Iterator[Target]:
    """Compile as on `macos` with `torch` (and fast math on/off) inside the block; None keeps
    what the environment or an enclosing block says. `counted=True` makes compiles cost-counting
    builds (cost_counters.py), a separate cache entry and a separate loader variant."""
    merged = dict(_OVERRIDE.get())
    wanted = {"macos": macos, "torch": torch, "fast_math": fast_math, "counted": counted}
    merged.update({k: v for k, v in wanted.items() if v is not None})
    token = _OVERRIDE.set(merged)
    try:
        yield current_target()
    finally:
        _OVERRIDE.reset(token)
