"""Assemble one compilable MSL source from MLX's kernel headers (see mlx_wheel.py), for compile_shader.

MLX compiles its kernels into a metallib, sets `[[function_constant(n)]]` values when it makes a
pipeline, and instantiates templates with its `instantiate_kernel` macro. torch.mps.compile_shader
(and so the emulator) takes one source string and cannot set function constants, so this module
makes the same kernel as a text, with these documented test-side rewrites and nothing else:

1. `#include "mlx/backend/metal/kernels/..."` is replaced by the header's text (each header once,
   `#pragma once` dropped), as MLX's own JIT build does; `<metal_*>` includes are kept.
2. `constant bool x [[function_constant(n)]];` becomes `constant bool x = <value>;` with the value
   MLX's host code would set (every function constant must be given one).
3. A parameter `[[buffer(n), function_constant(x)]]` keeps `[[buffer(n)]]` when x is true. When x
   is false Metal drops it from the pipeline but the name stays usable in code that only runs
   under `if (x)`: it moves into the body as a local of the same name (`nullptr` for a pointer,
   0 for a `constant T&`), so Python argument i still binds buffer i.
4. A gap in a kernel's buffer indices (e.g. sdpa_vector_2pass_1 has no buffer 6) gets a placeholder
   `const device uchar* mlx_unbound_buffer_N [[buffer(N)]]` so that Python argument i binds buffer i
   (torch's rule); the caller passes any tensor there.
5. Member functions qualified `threadgroup`, `device` or `constant` (complex.h's copies of its
   constructors and conversions for objects in those address spaces) are removed, keeping the
   `thread` ones: clang's C++ has no address-space-qualified member functions (only OpenCL C++
   does). None of the kernels tested here builds a complex number outside thread memory.
6. Non-ASCII characters (the `(c)` of MLX's copyright lines) become ASCII: torch.mps.compile_shader
   hands Metal the source as ASCII.

(`<metal_logging>` and array parameters in an address space, `constant const int64_t strides[2]`,
need no rewrite: the emulator itself handles both, as Metal does.)

The text built this way is ordinary MSL: on a Mac the same string goes to torch.mps.compile_shader.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping

from .kernel_signatures import matching, split_top_level

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"mlx/backend/metal/kernels/([^"]+)"[^\n]*$', re.M)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[^\n]*$", re.M)
_CONSTANT_DECL = re.compile(r"\bconstant\s+(bool|int|uint|short|ushort|float)\s+(\w+)\s*\[\[\s*function_constant\s*\(\s*(\d+)\s*\)\s*\]\]\s*;")
_CONDITIONAL_PARAM = re.compile(
    r"(?P<sep>[,(])(?P<decl>[^,()]*?)\[\[\s*(?P<attr>buffer\s*\(\s*\d+\s*\))\s*,\s*function_constant\s*\(\s*(?P<name>\w+)\s*\)\s*\]\]"
)
_KERNEL_SIGNATURE = re.compile(r"\[\[\s*kernel\b[^\]]*\]\]\s*void\s+(\w+)\s*\(")
_BUFFER_INDEX = re.compile(r"\[\[\s*buffer\s*\(\s*(\d+)\s*\)")
_SPACE_QUALIFIED_MEMBER = re.compile(r"\)\s*(?:const\s+)?(?:threadgroup|device|constant)\s*(?=[:{])")


class MlxSourceError(ValueError):
    """The MLX headers do not have the shape this assembler expects (a newer MLX changed them)."""


def inline_headers(kernels_dir: Path, headers: Iterable[str]) -> str:
    """The text of `headers` (relative to MLX's kernels folder) with their MLX includes inlined."""
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        path = kernels_dir / name
        if not path.is_file():
            raise MlxSourceError(f"{name}: not among the extracted MLX headers in {kernels_dir}")
        text = _PRAGMA_ONCE.sub("", path.read_text(encoding="utf-8")).replace("\u00a9", "(c)")
        if not text.isascii():
            raise MlxSourceError(f"{name}: non-ASCII text other than the copyright sign")
        body = _INCLUDE.sub(lambda m: expand(m.group(1)), text)
        return f"// ---- begin MLX {name}\n{body}\n// ---- end MLX {name}\n"

    return "".join(expand(h) for h in headers)


def set_function_constants(text: str, values: Mapping[str, bool | int]) -> str:
    """Rewrites 2 and 3 of the module docstring."""
    declared = {m.group(2) for m in _CONSTANT_DECL.finditer(text)}
    missing, unknown = declared - set(values), set(values) - declared
    if missing or unknown:
        raise MlxSourceError(f"function constants: missing values for {sorted(missing)}, not declared: {sorted(unknown)}")

    def literal(name: str) -> str:
        value = values[name]
        return ("true" if value else "false") if isinstance(value, bool) else str(int(value))

    text = _CONSTANT_DECL.sub(lambda m: f"constant {m.group(1)} {m.group(2)} = {literal(m.group(2))};", text)

    out, last = [], 0
    for m in _KERNEL_SIGNATURE.finditer(text):
        close = _matching(text, m.end() - 1)
        params, locals_ = _conditional_params(text[m.end() : close], values)
        body = text.index("{", close)
        out.append(text[last : m.end()] + params + text[close : body + 1] + locals_)
        last = body + 1
    out.append(text[last:])
    text = "".join(out)
    if "function_constant" in text:
        line = next(l for l in text.splitlines() if "function_constant" in l)
        raise MlxSourceError(f"a function_constant use this assembler cannot rewrite: {line.strip()!r}")
    return text


def _conditional_params(params: str, values: Mapping[str, bool | int]) -> tuple[str, str]:
    """The parameter list with its function_constant attributes resolved, and the locals that
    replace the parameters whose constant is false."""
    kept, locals_ = [], []
    for param in _split_params(params):
        m = _CONDITIONAL_PARAM.search(param)
        if not m:
            kept.append(param)
            continue
        name = m.group("name")
        if name not in values:
            raise MlxSourceError(f"parameter {param.strip()!r} depends on undeclared {name!r}")
        decl = m.group("decl").strip()
        if values[name]:
            kept.append(f"{m.group('sep')}{decl} [[{m.group('attr')}]]")
        elif "*" in decl:
            locals_.append(f" {decl} = nullptr;")
        else:  # `const constant int& n`: a plain zero of the value type
            var = re.match(r"(?:const\s+)?(?:constant|device)\s+(?:const\s+)?([\w:]+)\s*&\s*(\w+)$", decl)
            if not var:
                raise MlxSourceError(f"cannot turn the parameter {decl!r} into a local")
            locals_.append(f" const {var.group(1)} {var.group(2)} = 0;")
    return ",".join(p.lstrip(",") for p in kept), "".join(locals_)


def _split_params(params: str) -> list[str]:
    return ["," + p for p in split_top_level(params)]


def fill_buffer_gaps(text: str) -> str:
    """Rewrite 4 of the module docstring."""
    out, last = [], 0
    for m in _KERNEL_SIGNATURE.finditer(text):
        close = _matching(text, m.end() - 1)
        indices = {int(i) for i in _BUFFER_INDEX.findall(text[m.end() : close])}
        gaps = sorted(set(range(max(indices, default=-1) + 1)) - indices)
        placeholders = "".join(f"const device uchar* mlx_unbound_buffer_{i} [[buffer({i})]], " for i in gaps)
        out.append(text[last : m.end()] + placeholders)
        last = m.end()
    out.append(text[last:])
    return "".join(out)


def drop_address_space_members(text: str) -> str:
    """Rewrite 5 of the module docstring."""
    while m := _SPACE_QUALIFIED_MEMBER.search(text):
        start = max(text.rfind(c, 0, m.start()) for c in ";{}") + 1
        body = text.index("{", m.end())
        end = _matching(text, body, "{", "}") + 1
        if text[end : end + 1] == ";":
            end += 1
        text = text[:start] + "\n" * text.count("\n", start, end) + text[end:]
    return text


def assemble(kernels_dir: Path, headers: Iterable[str], constants: Mapping[str, bool | int],
             instantiations: Iterable[str] = (), prelude: str = "", epilogue: str = "") -> str:
    """One MSL source: `#include <metal_stdlib>`, `prelude`, the inlined `headers` with the function
    constants set, `epilogue` (e.g. a test kernel using MLX's templates), then `instantiations`
    (lines such as `instantiate_kernel("name", sdpa_vector, float, 64, 64)`)."""
    body = inline_headers(kernels_dir, headers)
    body = drop_address_space_members(body)
    body = fill_buffer_gaps(set_function_constants(body, constants))
    lines = "\n".join(instantiations)
    return f"#include <metal_stdlib>\n{prelude}\n{body}\n{epilogue}\n{lines}\n"


def _matching(text: str, open_pos: int, opener: str = "(", closer: str = ")") -> int:
    close = matching(text, open_pos, opener, closer)
    if close < 0:
        raise MlxSourceError(f"unbalanced {opener!r} in the MLX headers")
    return close
