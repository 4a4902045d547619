"""Where the source includes <metal_stdlib>, and which of its macros exist at that point.

On a Mac `#include <metal_stdlib>` pulls Apple's headers into the source at that line, so every
macro defined before it rewrites identifiers in those headers; they use short all-caps template
parameter names, so `#define R 4`, `#define D 64` or `#define BK 32` can break the library in
ways the message will not explain. The rule the emulator enforces: define macros after the
include, and prefix them. Only include guards are let through (an object-like macro with an
empty body named like a header guard, `FOO_H`, `FOO_H_`, `FOO_HPP`, `FOO_INCLUDED`,
`FOO_GUARD`): they are harmless in practice, and a header that guards itself and then includes
<metal_stdlib> is the ordinary pattern.

The input is `clang -E -dD` output produced with empty stand-ins for the <metal_*> headers: the
`#define`/`#undef` lines are still there, and entering a stand-in leaves a `# 1 "stub/<name>" 1`
line marker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_MARKER = re.compile(r'^# (\d+) "([^"]*)"((?: \d)*)\s*$')
_DEFINE = re.compile(r"^#define ([A-Za-z_]\w*)(\()?(.*)$")
_UNDEF = re.compile(r"^#undef ([A-Za-z_]\w*)")
_GUARD_NAME = re.compile(r"^\w*_(H|H_|HPP|HPP_|INCLUDED|GUARD)_*$")
_NOT_SOURCE = ("<built-in>", "<command line>")


@dataclass
class Preprocessed:
    text: str  # the -E text with #define/#undef lines blanked (line numbers kept)
    include_line: int | None  # index (0-based) into text.splitlines() of the first stub entry marker
    live_macros: list[str] = field(default_factory=list)  # define lines live at that point
    early_macros: list[tuple[str, str, int]] = field(default_factory=list)  # (name, file, line), not guards


def scan(dd_text: str, stub_dir: str) -> Preprocessed:
    """Split `clang -E -dD` output into code and the macro facts above."""
    lines = dd_text.split("\n")
    live: dict[str, tuple[str, str, int, bool]] = {}  # name -> (define line, file, line, is guard)
    include_line = None
    file, line = "", 1
    for i, text in enumerate(lines):
        marker = _MARKER.match(text)
        if marker:
            file, line = marker.group(2), int(marker.group(1))
            if include_line is None and file.startswith(stub_dir + "/") and " 1" in marker.group(3):
                include_line = i
                snapshot = dict(live)
            continue
        if text.startswith("#define ") or text.startswith("#undef "):
            lines[i] = ""
            if file not in _NOT_SOURCE:
                _track(text, file, line, live)
        line += 1
    result = Preprocessed("\n".join(lines), include_line)
    if include_line is not None:
        result.live_macros = [d for d, *_ in snapshot.values()]
        result.early_macros = [(n, f, ln) for n, (_, f, ln, guard) in snapshot.items() if not guard]
    return result


def _track(text: str, file: str, line: int, live: dict) -> None:
    undef = _UNDEF.match(text)
    if undef:
        live.pop(undef.group(1), None)
        return
    m = _DEFINE.match(text)
    if m:
        name, function_like, body = m.group(1), m.group(2), m.group(3)
        guard = not function_like and not body.strip() and bool(_GUARD_NAME.match(name))
        live[name] = (text, file, line, guard)


def early_macro_message(early: list[tuple[str, str, int]], source_lines: list[str]) -> str:
    """The error for macros defined before <metal_stdlib>: each one, where, and why."""
    out = ["macro(s) defined before #include <metal_stdlib>:"]
    for name, file, line in early:
        where = f"{file}:{line}" if file != "kernel.metal" else f"MSL line {line}"
        quoted = source_lines[line - 1].strip() if file == "kernel.metal" and 0 < line <= len(source_lines) else ""
        out.append(f"    {name} ({where}){': ' + quoted if quoted else ''}")
    out.append(
        "On a Mac the include pulls Apple's headers in at that line, and a macro defined earlier "
        "rewrites every identifier of its name in them (they use all-caps template parameter names "
        "such as R, D, N, T), which can break the compile. Define macros after the include and give "
        "them a prefix of your own (e.g. MFA_BLOCK_K, not BK). Include guards (an empty macro named "
        "like FOO_H) are allowed."
    )
    return "\n".join(out)


def macro_name(define_line: str) -> str:
    return _DEFINE.match(define_line).group(1)
