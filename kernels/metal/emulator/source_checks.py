"""Rules Apple's Metal compiler enforces that clang compiling MSL as C++ does not.

Each check raises MetalCompileError with the MSL line, what is wrong and what to do:
- `check_ascii`: torch hands the source to Metal as an ASCII NSString (compileLibrary uses
  NSASCIIStringEncoding), so any byte above 0x7F, in a comment too, fails the compile.
- `check_no_double`: MSL has no 64-bit float; `double` anywhere in the preprocessed kernel
  source is an error on a Mac (unsuffixed literals are float in MSL, so only the type counts).
- `check_bfloat_conversions`: MSL converts float (and half) to bfloat only explicitly; clang
  accepts the implicit conversion, so its -Wimplicit-float-conversion warnings that involve
  __bf16 become errors. float -> half stays allowed: MSL converts to half implicitly.
- `explain_bfloat`: under MSL 3.0 `bfloat` does not exist; a compile error naming it gets a
  note saying which target the emulator compiles for and how to guard the code.
Recursion is checked on the compiled IR (call_graph.py).
"""

from __future__ import annotations

import re

from .errors import MetalCompileError
from .kernel_signatures import line_of

_DOUBLE = re.compile(r"\bdouble\b")
_STRINGS = re.compile(r'"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'')
_BF16_WARNING = re.compile(r"^kernel\.metal:(\d+):(\d+): warning: (.*__bf16.*)\[-Wimplicit-float-conversion\]$", re.M)
_BFLOAT_NAME = re.compile(r"error: .*'(?:metal::)?(bfloat[234]?|simdgroup_bfloat8x8)'")


def check_ascii(source: str) -> None:
    for number, line in enumerate(source.splitlines(), 1):
        for column, ch in enumerate(line, 1):
            if ord(ch) > 0x7F:
                raise MetalCompileError(
                    f"MSL line {number}, column {column}: non-ASCII character {ch!r} (U+{ord(ch):04X}). "
                    "torch.mps.compile_shader passes the source to Metal as ASCII, so any byte above 0x7F "
                    "fails the compile on a Mac, in comments too; write it in ASCII."
                )


def check_no_double(preprocessed: str, source_lines: list[str]) -> None:
    """`preprocessed`: the -E text of the kernel source (line markers kept, shim not included)."""
    # Blanking string literals keeps offsets, so line_of can still read the line markers.
    for m in _DOUBLE.finditer(_STRINGS.sub(lambda s: " " * len(s.group(0)), preprocessed)):
        line = line_of(preprocessed, m.start())
        quoted = source_lines[line - 1].strip() if 0 < line <= len(source_lines) else ""
        raise MetalCompileError(
            f"MSL line {line}: `double` is not a Metal type (Apple's compiler rejects it: GPUs have no "
            f"64-bit float); use float.\n    MSL line {line}: {quoted}"
        )


def check_bfloat_conversions(stderr: str, source_lines: list[str]) -> None:
    found = _BF16_WARNING.findall(stderr)
    if not found:
        return
    out = ["implicit conversion to or from bfloat: MSL requires an explicit conversion (bfloat(x), "
           "static_cast<bfloat>(x)); clang accepts it, Apple's compiler does not:"]
    for line, column, text in found:
        quoted = source_lines[int(line) - 1].strip() if 0 < int(line) <= len(source_lines) else ""
        out.append(f"    MSL line {line}, column {column}: {text.strip()}\n        {quoted}")
    raise MetalCompileError("\n".join(out))


def explain_bfloat(message: str, target) -> str:
    """`message` with a note when it fails on `bfloat` under a target without it."""
    if target.has_bfloat or not _BFLOAT_NAME.search(message):
        return message
    return (
        f"{message}\nnote: `bfloat` needs MSL 3.1; the emulated target ({target.describe()}) has no bfloat "
        "type, as on that Mac. Guard bfloat code with `#if __HAVE_BFLOAT__` (or __METAL_VERSION__ >= 310), "
        "or choose the target with MSLEMU_MACOS / MSLEMU_TORCH."
    )
