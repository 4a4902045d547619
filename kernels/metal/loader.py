"""Metal kernel variants: block sizes per (dtype, head dims), #defines, and a per-variant library cache.

compile_shader has no function constants, so every specialization is a set of #defines prepended
to one source. The cache key is what changes the code (dtype, head dims, feature flags) and never a
sequence length or batch size: a new length reuses the compiled library.

On `mps` tensors the library comes from torch.mps.compile_shader (its kernels encode on PyTorch's
MPS stream); on CPU tensors with MFA_METAL_EMULATOR=1, from the MSL emulator.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

HERE = Path(__file__).parent
THREADGROUP_MEMORY_LIMIT = 32 * 1024  # bytes: Apple GPUs' maxThreadgroupMemoryLength (M1-M4)
KEY_BLOCK_CHOICES = (32, 16, 8)
MSL_TYPES = {torch.float16: "half", torch.bfloat16: "bfloat", torch.float32: "float"}
MASK_KINDS = {"none": 0, "bool": 1, "additive": 2}


def round_up8(n: int) -> int:
    return (n + 7) // 8 * 8


@dataclass(frozen=True)
class BlockConfig:
    """Tile geometry of one forward variant (see README.md for why these sizes)."""

    simdgroups: int  # WM: simdgroups per threadgroup, 8 query rows each
    key_block: int  # BK
    q_in_threadgroup: bool  # Q staged in threadgroup memory instead of registers
    k_pitch: int  # tile row pitches in elements (padded to spread threadgroup-memory banks)
    v_pitch: int
    q_pitch: int

    @property
    def query_block(self) -> int:
        return 8 * self.simdgroups

    @property
    def threads(self) -> int:
        return 32 * self.simdgroups


def threadgroup_bytes(config: BlockConfig, element_size: int) -> int:
    rows = config.key_block * (config.k_pitch + config.v_pitch)
    if config.q_in_threadgroup:
        rows += config.query_block * config.q_pitch
    return rows * element_size


def block_config(dtype: torch.dtype, dim_qk: int, dim_v: int) -> BlockConfig:
    """Block sizes for a head-dim pair and dtype.

    Up to D = 128 the 8 x D Q fragments stay in registers (D/4 floats per lane, as many again for
    O) and 4 simdgroups (BQ = 32) share each staged K/V block; beyond 128 Q moves to threadgroup
    memory and the threadgroup halves (BQ = 16) to keep registers and tile memory in budget.
    BK is the largest of 32/16/8 whose K+V(+Q) tiles fit 32 KiB; a pitch pad of 16 bytes (to
    spread the transposed K reads over banks) is kept only where it still fits.
    """
    qk, vv = round_up8(dim_qk), round_up8(dim_v)
    size = torch.tensor([], dtype=dtype).element_size()
    large = max(qk, vv) > 128
    simdgroups = 2 if large else 4
    for pad in (16 // size, 0):
        for key_block in KEY_BLOCK_CHOICES:
            config = BlockConfig(simdgroups, key_block, large, qk + pad, vv + pad, qk + pad)
            if threadgroup_bytes(config, size) <= THREADGROUP_MEMORY_LIMIT:
                return config
    raise ValueError(f"head dims ({dim_qk}, {dim_v}): no block configuration fits 32 KiB of threadgroup memory")


@dataclass(frozen=True)
class ForwardVariant:
    """Everything that changes the forward kernel's code: the library cache key."""

    dtype: torch.dtype
    dim_qk: int
    dim_v: int
    mask_kind: str = "none"
    mask_dtype: torch.dtype | None = None
    softcap: bool = False
    alibi: bool = False
    sinks: bool = False
    varlen: bool = False
    cu_seqlens_dtype: torch.dtype = torch.int32

    def config(self) -> BlockConfig:
        return block_config(self.dtype, self.dim_qk, self.dim_v)

    def defines(self, param_count: int) -> dict:
        config = self.config()
        mask_type = "uchar" if self.mask_kind != "additive" else MSL_TYPES[self.mask_dtype]
        return {
            "IN_T": MSL_TYPES[self.dtype], "MASK_T": mask_type, "MASK_KIND": MASK_KINDS[self.mask_kind],
            "CU_T": "int" if self.cu_seqlens_dtype == torch.int32 else "long",
            "DQK": self.dim_qk, "DV": self.dim_v,
            "DQK_PAD": round_up8(self.dim_qk), "DV_PAD": round_up8(self.dim_v),
            "BK": config.key_block, "WM": config.simdgroups, "Q_IN_TG": config.q_in_threadgroup,
            "K_PITCH": config.k_pitch, "V_PITCH": config.v_pitch, "Q_PITCH": config.q_pitch,
            "HAS_SOFTCAP": self.softcap, "HAS_ALIBI": self.alibi, "HAS_SINKS": self.sinks,
            "VARLEN": self.varlen, "ATTENTION_PARAM_COUNT": param_count,
        }


_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$', re.MULTILINE)


@lru_cache(maxsize=None)
def kernel_source(name: str) -> str:
    """A shipped .metal file with its local "..." includes inlined (torch.mps.compile_shader
    resolves only its own headers), each header once."""
    seen: set[str] = set()

    def expand(text: str) -> str:
        def include(match: re.Match) -> str:
            header = match.group(1)
            if header in seen:
                return ""
            seen.add(header)
            return expand((HERE / header).read_text())

        return _INCLUDE.sub(include, text)

    return expand((HERE / name).read_text())


def header_fields(header: str, struct: str) -> tuple[str, ...]:
    """The `long` field names of `struct` in a shipped header, in order (for the size check)."""
    text = (HERE / header).read_text()
    body = re.search(r"struct\s+" + struct + r"\s*\{(.*?)\};", text, re.DOTALL)
    if body is None:
        raise ValueError(f"{header}: expected a struct {struct}, found none")
    code = re.sub(r"//[^\n]*", "", body.group(1))
    names = []
    for declaration in code.split(";"):
        declaration = declaration.strip()
        if not declaration:
            continue
        if not declaration.startswith("long "):
            raise ValueError(f"{header}: {struct} fields must all be `long`, got {declaration!r}")
        names += [n.strip() for n in declaration[len("long "):].split(",")]
    return tuple(names)


def runtime_compile_shader(device: torch.device):
    """torch.mps.compile_shader for mps tensors, the emulator's for CPU tensors."""
    if device.type == "mps":
        return torch.mps.compile_shader
    from .emulator import compile_shader

    return compile_shader


_libraries: dict = {}
_lock = threading.Lock()


def library(variant, device: torch.device, param_count: int):
    """The compiled library of a variant on this device's runtime (compiled once per process).

    The variant names its source file (`SOURCE`, default the forward) and its #defines."""
    key = (device.type, variant)
    lib = _libraries.get(key)
    if lib is not None:
        return lib
    from .emulator import with_defines

    source_name = getattr(variant, "SOURCE", "attention_forward.metal")
    source = with_defines(kernel_source(source_name), variant.defines(param_count))
    with _lock:
        lib = _libraries.get(key)
        if lib is None:
            lib = runtime_compile_shader(device)(source)
            _libraries[key] = lib
    return lib


def cached_variants() -> list:
    return [variant for _, variant in _libraries]
