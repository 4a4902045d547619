"""Reject recursion, which Metal forbids and clang accepts.

Read from the kernel translation unit's LLVM IR as the front end emits it, before any
optimisation (the emulator compiles in two steps, source -> IR -> library, so this costs no
extra compile): every direct call is still there, none inlined away or turned into a loop.
Only functions of the kernel source take part; the shim's (namespaces metal, mslemu, std, and
the extern "C" runtime) are left out by their mangled names. A cycle, direct (f -> f) or mutual
(f -> g -> f), is a MetalCompileError naming the functions.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from .errors import MetalCompileError

_DEFINE = re.compile(r'^define\b[^@]*@("[^"]+"|[\w.$]+)\(', re.M)
_CALL = re.compile(r'\b(?:call|invoke)\b[^@\n]*?@("[^"]+"|[\w.$]+)\(')
_SHIM_NAMESPACES = {"metal", "mslemu", "std", "__gnu_cxx", "__cxxabiv1"}


def check_no_recursion(ir: str) -> None:
    graph = _user_call_graph(ir)
    cycle = _find_cycle(graph)
    if cycle:
        names = _demangle(cycle)
        raise MetalCompileError(
            "recursion: " + " -> ".join(names) + ". Metal does not allow recursive calls (direct or "
            "mutual): Apple's compiler rejects them, clang does not. Rewrite it as a loop."
        )


def _user_call_graph(ir: str) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    definitions = list(_DEFINE.finditer(ir))
    for i, m in enumerate(definitions):
        name = m.group(1).strip('"')
        if not is_kernel_source_function(name):
            continue
        end = definitions[i + 1].start() if i + 1 < len(definitions) else len(ir)
        callees = {c.strip('"') for c in _CALL.findall(ir, m.end(), end)}
        graph[name] = {c for c in callees if is_kernel_source_function(c)}
    return graph


def is_kernel_source_function(mangled: str) -> bool:
    """True unless the Itanium-mangled name is in a shim namespace (or not C++ at all: extern "C"
    runtime entry points, LLVM intrinsics)."""
    if not mangled.startswith("_Z"):
        return False
    s = mangled[2:].lstrip("Z")  # _ZZ<function>E<local>: a local entity belongs to its function
    if s.startswith("N"):
        s = s[1:].lstrip("rVKL")
    s = s.lstrip("L")
    if s.startswith("St") or s.startswith("Sa") or s.startswith("Ss"):
        return False
    m = re.match(r"(\d+)", s)
    if not m:
        return True  # an operator or other special name at global scope: the kernel's own
    start = len(m.group(1))
    return s[start : start + int(m.group(1))] not in _SHIM_NAMESPACES


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [f, g, ..., f], or None (iterative DFS: kernel sources can be long)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph.get(root, ())))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("llvm-cxxfilt") or shutil.which("c++filt") or next(
        (shutil.which(f"llvm-cxxfilt-{v}") for v in (21, 20, 19, 18, 17) if shutil.which(f"llvm-cxxfilt-{v}")), None)
    if not tool:
        return names
    try:
        out = subprocess.run([tool, *names], capture_output=True, text=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return names
    return [o or n for o, n in zip(out, names)]
