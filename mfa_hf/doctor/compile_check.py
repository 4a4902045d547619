"""Compile each planned variant in this process (one loop, no subprocess per variant) through the
loader's own `library(variant, device, param_count)`, catching failures per variant, and check each
kernel's `max_threads_per_threadgroup` against the threads it is launched with.

The threads a kernel is launched with are what it declares in `[[kernel,
max_total_threads_per_threadgroup(N)]]` (the launchers pass the same: 32 x simdgroups for the main
kernels, 32 for the helpers), evaluated with the variant's #defines. A compiler that cannot give the
kernel that many threads (registers, threadgroup memory) reports a smaller maximum, and the launch
would fail on a Mac.
"""

from __future__ import annotations

import ast
import operator
import re
import time
from typing import Callable

import torch

from .progress import run_each
from .variants import Planned

_KERNEL = re.compile(r"(?:\[\[\s*kernel\s*(?:,\s*max_total_threads_per_threadgroup\s*\((?P<threads>[^\]]*?)\)\s*)?\]\]"
                     r"|\bkernel)\s+void\s+(?P<name>\w+)")
_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+([^\n]+?)[ \t]*(?://[^\n]*)?$", re.MULTILINE)
MAX_ERROR_CHARS = 4000


def check_compiles(planned: list[Planned], device: torch.device, mode: str,
                   progress: Callable[[str], None] = lambda line: None) -> list[dict]:
    return run_each(planned, lambda item: check_one(item, device, mode), f"compile ({mode}) variants", 25, progress)


def check_one(item: Planned, device: torch.device, mode: str) -> dict:
    row = {"mode": mode, "family": item.family, "source": item.source, "id": item.id, "status": "failed",
           "error": item.error or None, "seconds": 0.0, "kernels": [], "same_code": list(item.same_code)}
    if item.error:
        return row
    from mfa_hf.kernels.metal import loader

    start = time.perf_counter()
    try:
        lib = loader.library(item.variant, device, item.param_count)
    except Exception as error:  # the compiler's message, whatever raised it
        row.update(error=_message(error), seconds=round(time.perf_counter() - start, 3))
        return row
    row["seconds"] = round(time.perf_counter() - start, 3)
    row["kernels"] = kernel_rows(lib, item)
    bad = [k for k in row["kernels"] if not k["ok"]]
    if not row["kernels"]:
        row["error"] = "the library has no kernel"
    elif bad:
        row["error"] = "; ".join(k["problem"] for k in bad)
    else:
        row["status"] = "passed"
    return row


def kernel_rows(lib, item: Planned) -> list[dict]:
    """Per kernel of the library: its max_threads_per_threadgroup and the threads it is launched with."""
    source = _variant_source(item)
    macros = _macros(source, item)
    rows = []
    for match in _KERNEL.finditer(source):
        name, expression = match["name"], match["threads"]
        launched = _evaluate(expression, macros) if expression else None
        row = {"name": name, "max_threads_per_threadgroup": None, "threads_launched": launched, "ok": False,
               "problem": ""}
        try:
            maximum = getattr(lib, name).max_threads_per_threadgroup
        except Exception as error:
            row["problem"] = f"{name}: no pipeline ({_message(error)})"
            rows.append(row)
            continue
        row["max_threads_per_threadgroup"] = None if maximum is None else int(maximum)
        if maximum is None:  # an older torch that does not expose it: nothing to check
            row["ok"], row["problem"] = True, f"{name}: max_threads_per_threadgroup not exposed by this torch"
        elif launched is not None and maximum < launched:
            row["problem"] = f"{name}: max_threads_per_threadgroup {maximum} < {launched} threads launched"
        else:
            row["ok"] = True
        rows.append(row)
    return rows


def _variant_source(item: Planned) -> str:
    """The source as compiled (the loader's own variant_source where it has one)."""
    from mfa_hf.kernels.metal import loader

    if hasattr(loader, "variant_source"):
        return loader.variant_source(item.variant, item.param_count)
    from mfa_hf.kernels.metal.emulator import with_defines

    return with_defines(loader.kernel_source(item.source), item.variant.defines(item.param_count))


def _macros(source: str, item: Planned) -> dict[str, str]:
    macros = {name: value for name, value in _DEFINE.findall(source)}
    for name, value in item.variant.defines(item.param_count).items():
        value = str(int(value)) if isinstance(value, bool) else str(value)
        macros.setdefault(name, value)
        macros.setdefault("MFA_" + name, value)
    return macros


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
              ast.Div: operator.floordiv}


def _evaluate(expression: str, macros: dict[str, str], depth: int = 0) -> int | None:
    """An integer constant expression of numbers, + - * / and object-like macros; None if it is not one."""
    if depth > 16:
        return None
    text = re.sub(r"\b(\d+)[uUlL]+\b", r"\1", expression.strip())
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return None

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in macros:
            result = _evaluate(macros[node.id], macros, depth + 1)
            if result is None:
                raise ValueError(node.id)
            return result
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(ast.dump(node))

    try:
        return int(value(tree.body))
    except (ValueError, ZeroDivisionError):
        return None


def _message(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + f"... ({len(text)} characters)"
