"""Find the kernels in (preprocessed) MSL source and what their parameter attributes say.

Only attributes are parsed here: which Python argument binds which parameter (``[[buffer(n)]]``,
or in order) and which built-in id a parameter receives. Parameter *types* are left to clang:
the generated entry points deduce them from the function, which also covers templates.

``[[max_total_threads_per_threadgroup(N)]]`` on a kernel (in its ``[[kernel, ...]]`` list, in an
attribute list of its own before or after ``kernel``, or after the parameter list, before the
body) is not evaluated here: N may be any constant expression, template parameters included
(MLX: ``WM * WN * 32``). `with_thread_limit_helpers` puts a constexpr function returning N next
to the kernel (a function template with the kernel's template parameters for a template), and
`Kernel.max_threads` is the call the generated entry points evaluate, so clang computes N for
each instantiation and rejects what is not a constant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Built-in parameter attributes, numbered as mslemu::Builtin in include/mslemu/binding.h.
BUILTINS = {
    "thread_position_in_grid": 1,
    "threadgroup_position_in_grid": 2,
    "thread_position_in_threadgroup": 3,
    "thread_index_in_threadgroup": 4,
    "threads_per_threadgroup": 5,
    "threadgroups_per_grid": 6,
    "simdgroup_index_in_threadgroup": 7,
    "thread_index_in_simdgroup": 8,
    "threads_per_simdgroup": 9,
    "threads_per_grid": 10,
    "simdgroups_per_threadgroup": 11,
    "thread_execution_width": 12,
    "quadgroup_index_in_threadgroup": 13,
    "thread_index_in_quadgroup": 14,
    "dispatch_threads_per_threadgroup": 15,
}
BUFFER = 0

_ATTR_LIST = re.compile(r"\[\[(.*?)\]\]", re.S)  # [[a, b(1), c(x)]]: any number of attributes
_ONE_ATTR = re.compile(r"^\s*(\w+)\s*(?:\(\s*(.*?)\s*\))?\s*$", re.S)
_VOID_FN = re.compile(r"\bvoid\s+(\w+)\s*\(")
_HOST_NAME = re.compile(r'host_name\s*\(\s*"([^"]+)"\s*\)')
_INSTANTIATION = re.compile(r'\btemplate\s*\[\[\s*host_name\s*\(\s*"([^"]+)"\s*\)\s*\]\]')
_MAX_THREADS = "max_total_threads_per_threadgroup"
_TRAILING_ATTRS = re.compile(r"(?:\s*\[\[.*?\]\])*\s*", re.S)  # attribute lists between `)` and `{`
_LINE_MARKERS = re.compile(r'^#\s*\d+\s+"[^"]*"[^\n]*$', re.M)


class KernelSourceError(ValueError):
    """The MSL source uses a kernel form the emulator cannot bind (with the MSL line)."""


@dataclass(frozen=True)
class Param:
    text: str  # the declaration as written, attributes included (for messages)
    kind: int  # BUFFER or a BUILTINS value
    buffer: int  # buffer index for BUFFER parameters, -1 otherwise


@dataclass(frozen=True)
class Kernel:
    name: str  # the name torch looks it up by: host_name or the function name
    function: str  # C++ expression naming the function, e.g. "attn<half, 64>"
    params: tuple[Param, ...]
    # C++ call returning the declared max_total_threads_per_threadgroup (e.g.
    # "mslemu_declared_threads_attn<half, 64>()"), None when the kernel declares none
    max_threads: str | None = None

    @property
    def symbol(self) -> str:
        return re.sub(r"\W", "_", self.name)


def find_kernels(text: str) -> list[Kernel]:
    """All kernels callable by name: plain kernels and host_name'd template instantiations."""
    definitions = _kernel_definitions(text)
    kernels = [d.kernel for d in definitions.values() if not d.is_template]
    kernels += _instantiations(text, {name: d.kernel for name, d in definitions.items()})
    names = [k.name for k in kernels]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise KernelSourceError(f"kernel names defined more than once: {duplicates}")
    return kernels


@dataclass(frozen=True)
class _Definition:
    kernel: Kernel
    is_template: bool
    start: int  # offset where the kernel's declaration (template head, attributes) begins
    helper: str | None  # the constexpr function giving its max_total_threads_per_threadgroup


def _kernel_definitions(text: str) -> dict[str, _Definition]:
    found: dict[str, _Definition] = {}
    for m in _VOID_FN.finditer(text):
        start = _statement_start(text, m.start())
        head = _LINE_MARKERS.sub("", text[start : m.start()])
        if not re.search(r"\bkernel\b", head):
            continue
        close = _matching(text, m.end() - 1, "(", ")")
        trailing = _TRAILING_ATTRS.match(text, close + 1)
        if not text.startswith("{", trailing.end()):
            continue  # a declaration, not the definition
        line = line_of(text, m.start())
        params = _parse_params(text[m.end() : close], line)
        host = _HOST_NAME.search(head)
        name, function = (host.group(1) if host else m.group(1)), m.group(1)
        limit = _max_threads_expression(head + " " + trailing.group(0), name, line)
        template = re.match(r"\s*template\s*<", head)
        helper = call = None
        if limit is not None:
            helper_name = f"mslemu_declared_threads_{function}"
            if template:
                close_t = _matching(head, template.end() - 1, "<", ">")
                template_head = " ".join(head[template.start() : close_t + 1].split())
                helper = f"{template_head} constexpr long long {helper_name}() {{ return ({limit}); }} "
                call = helper_name  # completed with each instantiation's template arguments
            else:
                helper = f"constexpr long long {helper_name}() {{ return ({limit}); }} "
                call = f"{helper_name}()"
        kernel = Kernel(name, function, params, call)
        found.setdefault(function, _Definition(kernel, "template" in head, start, helper))
    return found


def _max_threads_expression(attribute_text: str, kernel: str, line: int) -> str | None:
    """The N of the kernel's [[max_total_threads_per_threadgroup(N)]], as written (one at most)."""
    values = [arg for name, arg in _attributes(attribute_text) if name == _MAX_THREADS]
    if len(values) > 1:
        raise KernelSourceError(f"line {line}: kernel {kernel!r} declares {_MAX_THREADS} {len(values)} times")
    if values and not values[0].strip():
        raise KernelSourceError(f"line {line}: kernel {kernel!r}: {_MAX_THREADS} needs a value, e.g. {_MAX_THREADS}(256)")
    return " ".join(values[0].split()) if values else None


def with_thread_limit_helpers(text: str) -> str:
    """`text` with, before each kernel that declares max_total_threads_per_threadgroup, the
    constexpr function its entry point evaluates (same scope, same template parameters). Nothing
    is inserted across lines, so line numbers and the preprocessor's line markers stay right."""
    definitions = sorted(_kernel_definitions(text).values(), key=lambda d: d.start, reverse=True)
    for d in definitions:
        if d.helper:
            text = text[: d.start] + d.helper + text[d.start :]
    return text


def _instantiations(text: str, templates: dict[str, Kernel]) -> list[Kernel]:
    kernels = []
    for m in _INSTANTIATION.finditer(text):
        end = text.index(";", m.end())
        statement = _ATTR_LIST.sub(" ", text[m.end() : end])
        statement = re.sub(r"\b(kernel|void)\b", " ", statement).strip()
        if statement.startswith("decltype"):
            statement = statement[_matching(statement, statement.index("("), "(", ")") + 1 :].strip()
        fm = re.match(r"([\w:]+)\s*<", statement)
        if not fm:
            raise KernelSourceError(f"line {line_of(text, m.start())}: cannot read the instantiation {statement!r}")
        base = fm.group(1).split("::")[-1]
        close = _matching(statement, fm.end() - 1, "<", ">")
        if base not in templates:
            raise KernelSourceError(
                f"line {line_of(text, m.start())}: host_name {m.group(1)!r} instantiates {base!r}, "
                "which is not a kernel template defined in this source"
            )
        arguments = statement[fm.end() : close]
        function = f"{fm.group(1)}<{arguments}>"
        template = templates[base]
        limit = None
        if template.max_threads:  # the helper sits next to the template, in its namespace
            prefix = fm.group(1)[: -len(base)]
            limit = f"{prefix}{template.max_threads}<{arguments}>()"
        kernels.append(Kernel(m.group(1), function, template.params, limit))
    return kernels


def _parse_params(params_text: str, line: int) -> tuple[Param, ...]:
    params, implicit = [], 0
    for text in _split_top_level(params_text):
        param = _parse_param(text, line, implicit)
        if param.kind == BUFFER:
            implicit += 1
        params.append(param)
    indices = [p.buffer for p in params if p.kind == BUFFER]
    if len(set(indices)) != len(indices):
        raise KernelSourceError(f"line {line}: two parameters bind the same buffer index: {indices}")
    return tuple(params)


def _attributes(text: str) -> list[tuple[str, str]]:
    """Every (name, argument) in the parameter's attribute lists: `[[buffer(1), function_constant(x)]]`
    gives two (one [[...]] may hold several attributes, comma-separated)."""
    found = []
    for group in _ATTR_LIST.findall(text):
        for item in _split_top_level(group):
            m = _ONE_ATTR.match(item)
            found.append((m.group(1), m.group(2) or "") if m else (item, ""))
    return found


def _parse_param(text: str, line: int, implicit_index: int) -> Param:
    attrs = _attributes(text)
    names = [a for a, _ in attrs]
    if "function_constant" in names:
        raise KernelSourceError(
            f"line {line}: parameter {text!r}: function constants are not supported: torch.mps.compile_shader "
            "creates pipelines without function constant values, so nothing can set them; make the variant "
            "with a #define instead"
        )
    if "threadgroup" in names:
        raise KernelSourceError(
            f"line {line}: parameter {text!r}: threadgroup memory passed as a kernel argument is not "
            "supported (torch.mps.compile_shader cannot set its length); declare the array in the kernel body"
        )
    unknown = [a for a in names if a != "buffer" and a not in BUILTINS]
    if unknown or len(attrs) > 1:
        raise KernelSourceError(
            f"line {line}: parameter {text!r}: unsupported attribute(s) {unknown or names}; "
            f"supported: one of buffer(n) and {sorted(BUILTINS)}"
        )
    if attrs and attrs[0][0] == "buffer":
        return Param(text, BUFFER, int(attrs[0][1], 0))
    if attrs:
        return Param(text, BUILTINS[attrs[0][0]], -1)
    if re.search(r"\b(device|constant)\b", text):
        return Param(text, BUFFER, implicit_index)
    raise KernelSourceError(
        f"line {line}: parameter {text!r} is neither a device/constant buffer nor has a built-in attribute"
    )


def split_top_level(text: str) -> list[str]:
    """`text` cut at the commas outside any (), <>, [] or {}, each piece as written."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "(<[{":
            depth += 1
        elif ch in ")>]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _split_top_level(text: str) -> list[str]:
    return [" ".join(p.split()) for p in split_top_level(text) if p.strip()]


def _statement_start(text: str, pos: int) -> int:
    """Where the statement containing `pos` begins: after the previous statement or block. Its
    text up to `pos` is read without the preprocessor's line markers (`# 144 "kernel.metal"`
    after an #if'd-out block would read as the word kernel)."""
    return max(text.rfind(c, 0, pos) for c in ";{}") + 1


def matching(text: str, open_pos: int, opener: str = "(", closer: str = ")") -> int:
    """The index of the `closer` that balances the `opener` at open_pos, or -1."""
    depth = 0
    for i in range(open_pos, len(text)):
        if text[i] == opener:
            depth += 1
        elif text[i] == closer:
            depth -= 1
            if depth == 0:
                return i
    return -1


def _matching(text: str, open_pos: int, opener: str, closer: str) -> int:
    close = matching(text, open_pos, opener, closer)
    if close < 0:
        raise KernelSourceError(f"line {line_of(text, open_pos)}: unbalanced {opener!r}")
    return close


def line_of(text: str, pos: int) -> int:
    """The MSL line of `pos`, following the preprocessor's `# N "file"` line markers."""
    line, file_line = 1, 1
    for m in re.finditer(r'^# (\d+) "([^"]*)"[^\n]*$|\n', text[:pos], re.M):
        if m.group(1):
            file_line = int(m.group(1)) - 1
        else:
            file_line += 1
    return max(file_line, line)
