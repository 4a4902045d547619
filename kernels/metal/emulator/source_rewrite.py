"""Turn preprocessed MSL into C++ that the emulator's headers can compile.

Each rewrite keeps the text on its line, so the preprocessor's line markers stay right and
clang reports errors at the MSL line. What is rewritten, and why:

- ``threadgroup T x[N];`` in a function body becomes a reference into the threadgroup's shared
  arena (a C++ local would be private to each GPU thread);
- ``float4(a.xy, 0, 1)``, ``half4(f4)``: MSL vector constructors become ``mslemu::make<...>``
  (a C++ functional cast cannot take several arguments and would bit-cast a vector);
- ``0.5h`` becomes a half cast, and unsuffixed float literals get ``f``: MSL has no double;
- ``[[attributes]]`` are removed once the signatures have been read;
- an array parameter in an address space, ``constant const int64_t strides[2]`` (MLX's utils.h),
  becomes the pointer it is, ``constant const int64_t* strides`` (``T x[2][3]``: ``T (*x)[3]``):
  Metal adjusts it like any array parameter, clang refuses the array form ("parameter may not
  be qualified with an address space");
- program-scope ``constant`` variables become ``static const`` (Metal makes them read-only).
"""

from __future__ import annotations

import itertools
import re

from .kernel_signatures import Kernel

_SCALARS = "float|half|bfloat|int|uint|short|ushort|char|uchar|bool|long|ulong"
_VECTOR_CTOR = re.compile(rf"(?<![\w.:])(?:metal::)?((?:packed_)?(?:{_SCALARS})[234])\s*\(")
_THREADGROUP_DECL = re.compile(
    r"\bthreadgroup\s+([A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?)\s+(\w+)\s*((?:\[[^\[\];]+\])*)\s*;"
)
_NUMBER = r"(?:\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)"
_HALF_LITERAL = re.compile(rf"(?<![\w.])({_NUMBER}|\d+)[hH](?![\w.])")
_FLOAT_LITERAL = re.compile(rf"(?<![\w.])({_NUMBER})(?![\w.])")
_ATTRIBUTE = re.compile(r"\[\[[^\[\]]*\]\]")
_SPACE_ARRAY_PARAM = re.compile(  # applied after the attributes are gone, so `]` then `,` or `)`
    r"(?<![\w:])((?:const\s+)?(?:device|constant|threadgroup)\s+(?:const\s+)?[A-Za-z_][\w:]*"
    r"(?:\s*<[^;{}()]*?>)?(?:\s+const)?)(\s+)(\w+)(\s*\[[^\[\];]*\])((?:\s*\[[^\[\];]*\])*)(\s*)(?=[,)])"
)
_LINE_MARKER = re.compile(r'^#\s*\d+\s+"[^"]*".*$', re.M)


def rewrite(text: str) -> str:
    """Apply every rewrite to preprocessed MSL text (line markers are left alone)."""
    pieces, last = [], 0
    declaration_ids = itertools.count(1)  # one id per threadgroup declaration site
    for m in _LINE_MARKER.finditer(text):
        pieces.append(_rewrite_code(text[last : m.start()], declaration_ids))
        pieces.append(m.group(0))
        last = m.end()
    pieces.append(_rewrite_code(text[last:], declaration_ids))
    return _program_scope_constants("".join(pieces))


def _rewrite_code(code: str, declaration_ids: itertools.count) -> str:
    code = _rewrite_threadgroup_declarations(code, declaration_ids)
    code = _VECTOR_CTOR.sub(r"mslemu::make<metal::\1>(", code)
    code = _HALF_LITERAL.sub(_half_literal, code)
    code = _FLOAT_LITERAL.sub(r"\1f", code)
    return _SPACE_ARRAY_PARAM.sub(_array_parameter, _ATTRIBUTE.sub("", code))


def _array_parameter(m: re.Match) -> str:
    type_, space, name, first, rest, tail = m.groups()
    kept_lines = "\n" * first.count("\n")  # keep the line count
    declarator = f"(*{name}){rest}" if rest else f"*{name}"
    return f"{type_}{space}{declarator}{kept_lines}{tail}"


def _half_literal(m: re.Match) -> str:
    number = m.group(1)
    return f"((metal::half){number}f)" if re.search(r"[.eE]", number) else f"((metal::half){number})"


def _rewrite_threadgroup_declarations(code: str, declaration_ids: itertools.count) -> str:
    def replace(m: re.Match) -> str:
        decl_id = next(declaration_ids)
        type_, name, dims = m.group(1), m.group(2), m.group(3)
        alloc = f"mslemu_threadgroup_alloc({decl_id}u, sizeof({type_}{dims}), alignof({type_}), __LINE__)"
        if dims:
            return f"threadgroup {type_} (&{name}){dims} = *(threadgroup {type_} (*){dims}){alloc};"
        return f"threadgroup {type_} &{name} = *(threadgroup {type_} *){alloc};"

    return _THREADGROUP_DECL.sub(replace, code)


def _program_scope_constants(text: str) -> str:
    """`constant T x = ...;` outside any braces or parentheses: make it static and read-only."""
    out, depth, last = [], 0, 0
    for m in re.finditer(r"[{}()]|\bconstant\b", text):
        token = m.group(0)
        if token in "{(":
            depth += 1
        elif token in "})":
            depth -= 1
        elif depth == 0:
            out.append(text[last : m.start()] + "static const constant")
            last = m.end()
    out.append(text[last:])
    return "".join(out)


def entry_points(kernels: list[Kernel]) -> str:
    """C++ for each kernel: its parameter table, its launch entry, its parameter description and
    its declared max_total_threads_per_threadgroup (a constant clang must evaluate; 0: none)."""
    # binding.h is the emulator's own, not part of <metal_stdlib>: included here, after the kernel
    # source, so that a source without the include still gets its entry points.
    lines = ['\n# 1 "mslemu-entry-points"', '#include "mslemu/binding.h"']
    for k in kernels:
        specs = ", ".join(f"{{{p.kind}, {p.buffer}}}" for p in k.params) or "{0, -1}"
        lines += [
            f"static const mslemu::ParamSpec mslemu_spec_{k.symbol}[] = {{{specs}}};",
            f'extern "C" __attribute__((visibility("default"))) void mslemu_kernel_{k.symbol}'
            f"(void* const* mslemu_b, const mslemu_ids* mslemu_t) "
            f"{{ mslemu::invoke(&{k.function}, mslemu_spec_{k.symbol}, mslemu_b, mslemu_t); }}",
            f'extern "C" __attribute__((visibility("default"))) int mslemu_params_{k.symbol}'
            f"(int64_t* mslemu_out) {{ return mslemu::describe(&{k.function}, mslemu_out); }}",
            f'extern "C" __attribute__((visibility("default"))) long long mslemu_max_threads_{k.symbol}() {{ '
            + (f"constexpr long long max_total_threads_per_threadgroup = {k.max_threads}; "
               "static_assert(max_total_threads_per_threadgroup > 0, "
               f'"[[max_total_threads_per_threadgroup(N)]] of kernel {k.name}: N must be a positive integer"); '
               "return max_total_threads_per_threadgroup; }" if k.max_threads else "return 0; }"),
        ]
    return "\n".join(lines) + "\n"
