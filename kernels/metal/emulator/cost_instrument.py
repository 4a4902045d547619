"""Adds cost counting to a counted build's LLVM IR (compiler.py runs it on clang's optimised IR).

Every basic block gets its static counts (the `COUNTED` list, runtime.h's first
`kInstrumentedCounters` counters, same order), and a call `mslemu_cost_add(counts)` at its top:
the runtime sums the counts of the blocks each GPU thread executes, so the totals are exact
dynamic counts of the instructions below, over every thread of a launch. The IR is clang -O2's
(inlining, CSE, loop-invariant motion and unrolling done, as Apple's compiler also does) with
vectorisation and induction-variable widening off, so scalar kernel code stays scalar and a
32-bit loop counter stays 32-bit (x86 would widen it to 64 bits, Apple's compiler has no reason to).

Per instruction (a vector instruction counts once per element):
- memory, wherever the instruction comes from (kernel or shim): `load`/`store`/`atomicrmw`/
  `cmpxchg` and `llvm.memcpy/memmove/memset` through a pointer in address space 1 (`device`), 2
  (`constant`) or 3 (`threadgroup`): the accessed type's size in bytes (read-modify-write: both);
  thread-private memory (address space 0) is not counted;
- `mma_lane_calls`: a lane's call into `simdgroup_multiply_accumulate` (the shim's rendezvous with
  `mma_fn`); every lane takes part, so MMAs (8x8x8, 512 FMAs) = lane calls / 32;
- ALU, only for code that the kernel or the MSL library (math, vectors) contributes, not for the
  shim's models of hardware units (simdgroup matrix loads/products, simd collectives, atomics,
  argument binding: HARDWARE_MODEL_FILES), whose work the GPU does in dedicated hardware:
  - `float_ops`: `fadd fsub fmul fdiv frem fneg fcmp`, floating-point intrinsics (`llvm.fma`,
    `llvm.exp2`, `llvm.maxnum`, ...) and calls to external math functions (`exp2f`, `tanhf`, ...):
    one each (an FMA is one operation, two FLOPs);
  - `float_conversions`: `fpext fptrunc sitofp uitofp fptosi fptoui`;
  - `int64_ops`: integer arithmetic, logic and shifts on `i64` operands, `icmp` on `i64`, and the
    i64 forms of min/max/abs-like intrinsics. Address arithmetic inside `getelementptr`, 32-to-64-bit
    extensions and pointer comparisons are not counted (the GPU folds most of it into its
    addressing); explicit `long` index arithmetic in the source is.

A block whose counts are all zero gets no call. Counting never changes what the kernel computes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePath

from .kernel_signatures import split_top_level

# clang front end: line tables let each instruction be traced to the file it was written in.
FRONT_END_FLAGS = ("-gline-tables-only",)
# The optimisation the counts are taken after (on top of the build's -O2).
OPTIMISE_FLAGS = ("-fno-vectorize", "-fno-slp-vectorize", "-mllvm", "-indvars-widen-indvars=false")
COUNTED = ("device_bytes_read", "device_bytes_written", "constant_bytes_read", "threadgroup_bytes_read",
           "threadgroup_bytes_written", "mma_lane_calls", "float_ops", "float_conversions", "int64_ops")
# Shim headers that model hardware units, and the generated entry points: no ALU counted there.
HARDWARE_MODEL_FILES = frozenset({"matrix.h", "simd.h", "atomic.h", "binding.h", "runtime_api.h", "logging.h",
                                  "mslemu-entry-points"})
_SPACE_COUNTERS = {"1": ("device_bytes_read", "device_bytes_written"), "2": ("constant_bytes_read", None),
                   "3": ("threadgroup_bytes_read", "threadgroup_bytes_written")}
_FLOAT_BINARY = frozenset({"fadd", "fsub", "fmul", "fdiv", "frem", "fneg", "fcmp"})
_CONVERSIONS = frozenset({"fpext", "fptrunc", "sitofp", "uitofp", "fptosi", "fptoui"})
_INT_BINARY = frozenset({"add", "sub", "mul", "udiv", "sdiv", "urem", "srem", "shl", "lshr", "ashr", "and", "or",
                         "xor", "icmp"})
_FLAGS = frozenset({"nuw", "nsw", "exact", "disjoint", "samesign", "nnan", "ninf", "nsz", "arcp", "contract", "afn",
                    "reassoc", "fast", "tail", "musttail", "notail", "volatile", "atomic", "weak"})
_INT64_INTRINSIC = re.compile(r"llvm\.(?:[su](?:min|max)|abs|ctpop|ctlz|cttz|fsh[lr]|bswap|bitreverse|"
                              r"[su](?:add|sub|mul)\.with\.overflow|[su](?:add|sub)\.sat)\.(?:v\d+)?i64$")
_FLOAT_SUFFIX = re.compile(r"\.(?:v\d+)?(?:f16|bf16|f32|f64)$")
_MEMORY_INTRINSIC = re.compile(r"llvm\.mem(cpy|move|set)(?:\.inline)?\.")
_CALLEE = re.compile(r"@([\w.$]+)\(")
_LABEL = re.compile(r"^([\w.$-]+|\"[^\"]+\"):")
_METADATA = re.compile(r"^!(\d+) = (?:distinct )?!(\w+)\((.*)\)\s*$")
_MMA_COLLECTIVE = re.compile(r"@_ZN6mslemu6mma_fn")  # the shim's collective behind simdgroup_multiply_accumulate
_FLOAT_TYPES = frozenset({"half", "bfloat", "float", "double"})


class CostInstrumentError(RuntimeError):
    """The IR has a construct the counters cannot size (a counted build refuses it, never guesses)."""


def instrument(ir: str) -> str:
    """`ir` with a `mslemu_cost_add` call at the top of every block that has something to count."""
    lines = ir.split("\n")
    files = DebugFiles(lines)
    out: list[str] = []
    tables: list[str] = []
    function: _Function | None = None
    for line in lines:
        if line.startswith("define "):
            function = _Function(files.subprogram_file(_dbg(line)), files)
            out.append(line)
            continue
        if function is None:
            out.append(line)
            continue
        if line.startswith("}"):
            function.finish_block(out, tables)
            function = None
            out.append(line)
            continue
        if _LABEL.match(line):
            function.finish_block(out, tables)
        function.add(line)
    if tables:
        out += tables + ["declare void @mslemu_cost_add(ptr)"]
    return "\n".join(out)


def block_counts(instructions: list[str], default_file: str = "kernel.metal",
                 files: "DebugFiles | None" = None) -> dict[str, int]:
    """The counts of one block's instructions (`COUNTED` names)."""
    counts = dict.fromkeys(COUNTED, 0)
    for text in instructions:
        file = files.location_file(_dbg(text)) if files else None
        _count(text, counts, alu=(file or default_file) not in HARDWARE_MODEL_FILES)
    return counts


@dataclass
class _Function:
    default_file: str
    files: "DebugFiles"
    block: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.block.append(line)

    def finish_block(self, out: list[str], tables: list[str]) -> None:
        """Write the pending block, its counting call after the label and any phi nodes."""
        body = [ln for ln in self.block if ln.strip() and not ln.lstrip().startswith(";") and not _LABEL.match(ln)]
        counts = block_counts(body, self.default_file, self.files)
        at = 0
        while at < len(self.block) and (_LABEL.match(self.block[at]) or not self.block[at].strip()
                                        or self.block[at].lstrip().startswith(";")
                                        or re.match(r"\s+%[\w.$-]+ = phi ", self.block[at])):
            at += 1
        if any(counts.values()):
            name = f"@mslemu.cost.{len(tables)}"
            values = ", ".join(f"i64 {counts[c]}" for c in COUNTED)
            tables.append(f"{name} = private unnamed_addr constant [{len(COUNTED)} x i64] [{values}]")
            self.block.insert(at, f"  call void @mslemu_cost_add(ptr {name})")
        out.extend(self.block)
        self.block = []


def _count(text: str, counts: dict[str, int], alu: bool) -> None:
    body = re.sub(r"^\s*%[\w.$-]+ = ", "", text.split(", !dbg ")[0]).strip()
    words = body.split(" ", 1)
    op, rest = words[0], words[1] if len(words) > 1 else ""
    while op in _FLAGS and rest:  # `tail call`, `load volatile`...
        op, _, rest = rest.partition(" ")
    rest = _skip_flags(rest)
    if op == "load":
        ty, ptr = _split_top_level(rest)[:2]
        _memory(counts, _pointer_space(ptr), _size(ty), read=True)
    elif op == "store":
        value, ptr = _split_top_level(rest)[:2]
        _memory(counts, _pointer_space(ptr), _size(_leading_type(value)), write=True)
    elif op == "atomicrmw":
        ptr, value = _split_top_level(rest.split(" ", 1)[1])[:2]
        _memory(counts, _pointer_space(ptr), _size(_leading_type(value)), read=True, write=True)
    elif op == "cmpxchg":
        ptr, expected = _split_top_level(rest)[:2]
        _memory(counts, _pointer_space(ptr), _size(_leading_type(expected)), read=True, write=True)
    elif op == "call":
        _count_call(rest, counts, alu)
    elif not alu:
        return
    elif op in _FLOAT_BINARY:
        ty = _skip_flags(rest.split(" ", 1)[1] if op == "fcmp" else rest)
        counts["float_ops"] += _elements(_leading_type(ty))
    elif op in _CONVERSIONS:
        counts["float_conversions"] += _elements(_leading_type(rest))
    elif op in _INT_BINARY:
        ty = _leading_type(_skip_flags(rest.split(" ", 1)[1]) if op == "icmp" else rest)
        if _scalar(ty) == "i64":
            counts["int64_ops"] += _elements(ty)


def _count_call(rest: str, counts: dict[str, int], alu: bool) -> None:
    callee = _CALLEE.search(rest)
    if callee is None:
        return  # an indirect call: its target's blocks are counted where they are defined
    name = callee.group(1)
    if name == "mslemu_simd_rendezvous":
        counts["mma_lane_calls"] += bool(_MMA_COLLECTIVE.search(rest))
        return
    memory = _MEMORY_INTRINSIC.match(name)
    if memory:
        _memory_intrinsic(memory.group(1), rest[callee.end():], counts)
        return
    if not alu or name.startswith("mslemu"):
        return
    result = _leading_type(_skip_return_attributes(rest[: callee.start()]))
    if name.startswith("llvm."):
        if _FLOAT_SUFFIX.search(name):
            counts["float_ops"] += _elements(result) if _scalar(result) in _FLOAT_TYPES else 1
        elif _INT64_INTRINSIC.match(name):
            counts["int64_ops"] += _elements(result) if _scalar(result) == "i64" else 1
    elif _scalar(result) in _FLOAT_TYPES and not name.startswith("_Z"):
        counts["float_ops"] += _elements(result)  # an external math function (exp2f, tanhf...)


def _memory_intrinsic(kind: str, args_text: str, counts: dict[str, int]) -> None:
    args = _split_top_level(args_text.rsplit(")", 1)[0])
    length = args[2].split()
    if length[-1].lstrip("-").isdigit() is False:
        raise CostInstrumentError(f"llvm.mem{kind} with a length known only at run time: {args_text.strip()}")
    n = int(length[-1])
    _memory(counts, _pointer_space(args[0]), n, write=True)
    if kind != "set":
        _memory(counts, _pointer_space(args[1]), n, read=True)


def _memory(counts: dict[str, int], space: str, size: int, read: bool = False, write: bool = False) -> None:
    reader, writer = _SPACE_COUNTERS.get(space, (None, None))
    if read and reader:
        counts[reader] += size
    if write:
        if space == "2":
            raise CostInstrumentError("a store into the constant address space")
        if writer:
            counts[writer] += size


def _pointer_space(operand: str) -> str:
    m = re.match(r"\s*ptr(?: addrspace\((\d+)\))?", operand)
    if not m:
        raise CostInstrumentError(f"expected a pointer operand, got {operand!r}")
    return m.group(1) or "0"


def _skip_flags(text: str) -> str:
    words = text.split(" ")
    while words and words[0] in _FLAGS:
        words.pop(0)
    return " ".join(words)


def _skip_return_attributes(text: str) -> str:
    """`call`'s text before the callee, without calling convention and return attributes."""
    words = [w for w in text.split(" ") if w and w not in _FLAGS and not re.match(
        r"(?:noundef|nonnull|signext|zeroext|inreg|noalias|fastcc|ccc|range\(.*|dereferenceable.*|align)$", w)]
    return " ".join(words)


def _split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside brackets, each piece stripped."""
    return [part.strip() for part in split_top_level(text)]


def _leading_type(text: str) -> str:
    """The type at the start of `text` (`<4 x half> %x` -> `<4 x half>`)."""
    text = text.strip()
    if text[:1] in "<[{":
        closer = {"<": ">", "[": "]", "{": "}"}[text[0]]
        depth = 0
        for i, ch in enumerate(text):
            depth += ch == text[0]
            depth -= ch == closer
            if depth == 0:
                return text[: i + 1]
    m = re.match(r"ptr(?: addrspace\(\d+\))?|[\w]+", text)
    if not m:
        raise CostInstrumentError(f"no type at the start of {text!r}")
    return m.group(0)


def _scalar(ty: str) -> str:
    m = re.match(r"<\s*\d+\s*x\s*(.+)>$", ty.strip())
    return m.group(1).strip() if m else ty.strip()


def _elements(ty: str) -> int:
    m = re.match(r"<\s*(\d+)\s*x\s*.+>$", ty.strip())
    return int(m.group(1)) if m else 1


_SIZES = {"half": 2, "bfloat": 2, "float": 4, "double": 8, "ptr": 8}


def _size(ty: str) -> int:
    """Bytes an access of type `ty` moves (vectors and arrays: element size times count)."""
    ty = ty.strip()
    m = re.match(r"[<\[]\s*(\d+)\s*x\s*(.+)[>\]]$", ty)
    if m:
        return int(m.group(1)) * _size(m.group(2))
    if ty.startswith("{") or ty.startswith("<{"):
        return sum(_size(part) for part in _split_top_level(ty.strip("<>{} ")))
    if ty.startswith("ptr"):
        return 8
    if re.fullmatch(r"i\d+", ty):
        return max(1, (int(ty[1:]) + 7) // 8)
    if ty in _SIZES:
        return _SIZES[ty]
    raise CostInstrumentError(f"cannot size the type {ty!r}")


def _dbg(line: str) -> str | None:
    m = re.search(r"!dbg (!\d+)", line)
    return m.group(1)[1:] if m else None


class DebugFiles:
    """Which source file each `!dbg` location (and each function's subprogram) comes from."""

    def __init__(self, lines: list[str]):
        self.nodes: dict[str, tuple[str, str]] = {}
        for line in lines:
            m = _METADATA.match(line)
            if m:
                self.nodes[m.group(1)] = (m.group(2), m.group(3))

    def _field(self, node: str, name: str) -> str | None:
        m = re.search(rf"\b{name}: (!?\"?[^,\"]*\"?)", self.nodes.get(node, ("", ""))[1])
        return m.group(1).strip('"').lstrip("!") if m else None

    def _scope_file(self, scope: str | None, depth: int = 0) -> str | None:
        if scope is None or depth > 64:
            return None
        file = self._field(scope, "file")
        if file is not None:
            name = self._field(file, "filename")
            return PurePath(name).name if name else None
        return self._scope_file(self._field(scope, "scope"), depth + 1)

    def location_file(self, location: str | None) -> str | None:
        """The file of the innermost scope of a DILocation (for inlined code: where it was written)."""
        if location is None:
            return None
        return self._scope_file(self._field(location, "scope"))

    def subprogram_file(self, subprogram: str | None) -> str:
        return self._scope_file(subprogram) or "kernel.metal"
