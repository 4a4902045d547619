"""Find the kernels in (preprocessed) MSL source and what their parameter attributes say.

Only attributes are parsed here: which Python argument binds which parameter (``[[buffer(n)]]``,
or in order) and which built-in id a parameter receives. Parameter *types* are left to clang:
the generated entry points deduce them from the function, which also covers templates.
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

    @property
    def symbol(self) -> str:
        return re.sub(r"\W", "_", self.name)


def find_kernels(text: str) -> list[Kernel]:
    """All kernels callable by name: plain kernels and host_name'd template instantiations."""
    definitions = _kernel_definitions(text)
    kernels = [k for k, is_template in definitions.values() if not is_template]
    kernels += _instantiations(text, {name: k for name, (k, _) in definitions.items()})
    names = [k.name for k in kernels]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise KernelSourceError(f"kernel names defined more than once: {duplicates}")
    return kernels


def _kernel_definitions(text: str) -> dict[str, tuple[Kernel, bool]]:
    found: dict[str, tuple[Kernel, bool]] = {}
    for m in _VOID_FN.finditer(text):
        head = _statement_head(text, m.start())
        if not re.search(r"\bkernel\b", head):
            continue
        close = _matching(text, m.end() - 1, "(", ")")
        if not text[close + 1 :].lstrip().startswith("{"):
            continue  # a declaration, not the definition
        params = _parse_params(text[m.end() : close], _line_of(text, m.start()))
        host = _HOST_NAME.search(head)
        name = host.group(1) if host else m.group(1)
        found.setdefault(m.group(1), (Kernel(name, m.group(1), params), "template" in head))
    return found


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
            raise KernelSourceError(f"line {_line_of(text, m.start())}: cannot read the instantiation {statement!r}")
        base = fm.group(1).split("::")[-1]
        close = _matching(statement, fm.end() - 1, "<", ">")
        if base not in templates:
            raise KernelSourceError(
                f"line {_line_of(text, m.start())}: host_name {m.group(1)!r} instantiates {base!r}, "
                "which is not a kernel template defined in this source"
            )
        function = f"{fm.group(1)}<{statement[fm.end():close]}>"
        kernels.append(Kernel(m.group(1), function, templates[base].params))
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


def _split_top_level(text: str) -> list[str]:
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
    return [" ".join(p.split()) for p in parts if p.strip()]


def _statement_head(text: str, pos: int) -> str:
    """Text from the end of the previous statement or block up to `pos`, without the preprocessor's
    line markers (`# 144 "kernel.metal"` after an #if'd-out block would read as the word kernel)."""
    start = max(text.rfind(c, 0, pos) for c in ";{}") + 1
    return re.sub(r'^#\s*\d+\s+"[^"]*"[^\n]*$', "", text[start:pos], flags=re.M)


def _matching(text: str, open_pos: int, opener: str, closer: str) -> int:
    depth = 0
    for i in range(open_pos, len(text)):
        if text[i] == opener:
            depth += 1
        elif text[i] == closer:
            depth -= 1
            if depth == 0:
                return i
    raise KernelSourceError(f"line {_line_of(text, open_pos)}: unbalanced {opener!r}")


def _line_of(text: str, pos: int) -> int:
    """The MSL line of `pos`, following the preprocessor's `# N "file"` line markers."""
    line, file_line = 1, 1
    for m in re.finditer(r'^# (\d+) "([^"]*)"[^\n]*$|\n', text[:pos], re.M):
        if m.group(1):
            file_line = int(m.group(1)) - 1
        else:
            file_line += 1
    return max(file_line, line)
