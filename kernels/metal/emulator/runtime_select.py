"""Which Metal runtime a kernel test (or the `metal` backend) uses.

On a Mac with a working `mps` device: torch.mps.compile_shader and `mps` tensors. Elsewhere:
the emulator and CPU tensors. `MFA_METAL_EMULATOR=1` forces the emulator (also on a Mac) and is
what lets mfa_hf's `metal` backend serve CPU tensors through it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch


def emulator_enabled() -> bool:
    """True when MFA_METAL_EMULATOR=1: the metal backend should run CPU tensors on the emulator."""
    return os.environ.get("MFA_METAL_EMULATOR", "") == "1"


@dataclass(frozen=True)
class MetalRuntime:
    compile_shader: Callable[[str], Any]
    device: str  # where kernel arguments must live: "mps" or "cpu"
    is_emulated: bool

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """`t` moved to this runtime's device."""
        return t.to(self.device)


def metal_runtime() -> MetalRuntime:
    """Real Metal when available (and not overridden by MFA_METAL_EMULATOR=1), else the emulator."""
    if not emulator_enabled() and torch.backends.mps.is_available():
        return MetalRuntime(_real_compile_shader, "mps", False)
    from .library import compile_shader

    return MetalRuntime(compile_shader, "cpu", True)


def _real_compile_shader(source: str):
    lib = torch.mps.compile_shader(source)
    return lib


_METAL_STDLIB = re.compile(r"^[ \t]*#[ \t]*include[ \t]*<metal_stdlib>[^\n]*\n?", re.MULTILINE)


def with_defines(source: str, defines: Mapping[str, Any]) -> str:
    """`source` with `#define NAME VALUE` lines for its variant (compile_shader takes no options;
    bool True -> 1, False -> 0). Works on both runtimes.

    The lines go right after the source's first `#include <metal_stdlib>`, never before it: on a
    Mac a macro defined first rewrites every identifier of that name in Apple's headers (which use
    all-caps template parameter names), so `#define D 64` could break the whole library. A source
    without that include gets them at the top. Give variant macros a prefix of your own (the
    project's kernels use MFA_) so they cannot meet a name used later either."""
    lines = []
    for name, value in defines.items():
        if not name.isidentifier():
            raise ValueError(f"defines: expected identifier names, got {name!r}")
        value = int(value) if isinstance(value, bool) else value
        lines.append(f"#define {name} {value}\n")
    block = "".join(lines)
    include = _METAL_STDLIB.search(source)
    if include is None:
        return block + source
    end = include.end()
    if not source[:end].endswith("\n"):
        block = "\n" + block
    return source[:end] + block + source[end:]
