"""Metal kernel variants: block sizes per (dtype, head dims), #defines, and a per-variant library cache.

A variant (ForwardVariant in forward.py, BackwardVariant, DecodeVariant, AppendVariant in the other
launchers) names its source file (`SOURCE`) and its #defines; `library(variant, device, param_count)`
compiles it once per process.

compile_shader has no function constants, so every specialization is a set of #defines (named
MFA_..., placed after `#include <metal_stdlib>`) in one source. The cache key is what changes the code (dtype, head dims, feature flags) and never a
sequence length or batch size: a new length reuses the compiled library.

On `mps` tensors the library comes from torch.mps.compile_shader (its kernels encode on PyTorch's
MPS stream); on CPU tensors with MFA_METAL_EMULATOR=1, from the MSL emulator.
"""

from __future__ import annotations

import math
import platform
import re
import threading
import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from mfa_hf.kernel_fallback import KernelUnavailable

HERE = Path(__file__).parent
THREADGROUP_MEMORY_LIMIT = 32 * 1024  # bytes: Apple GPUs' maxThreadgroupMemoryLength (M1-M4)
KEY_BLOCK_CHOICES = (32, 16, 8)
SIMDGROUP_CHOICES = (4, 2)  # BQ = 32 as MLX's steel attention; 16 only where Q's tile does not fit with 32
SHARED_KV_FROM_DIM = 128  # K and V share one tile from this padded head dim on (see block_config)
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
    shared_kv: bool = False  # K and V take turns in one tile (stage K, barrier, reuse it for V)

    @property
    def query_block(self) -> int:
        return 8 * self.simdgroups

    @property
    def threads(self) -> int:
        return 32 * self.simdgroups


def threadgroup_bytes(config: BlockConfig, element_size: int) -> int:
    kv = max(config.k_pitch, config.v_pitch) if config.shared_kv else config.k_pitch + config.v_pitch
    rows = config.key_block * kv
    if config.q_in_threadgroup:
        rows += config.query_block * config.q_pitch
    return rows * element_size


@lru_cache(maxsize=None)
def block_config(dtype: torch.dtype, dim_qk: int, dim_v: int) -> BlockConfig:
    """Block sizes for a head-dim pair and dtype.

    Up to D = 128 the 8 x D Q fragments stay in registers (D/4 floats per lane, as many again for
    O); beyond 128 Q moves to threadgroup memory. 4 simdgroups (BQ = 32, as MLX) share each staged
    K/V block wherever that fits, else 2. From D = 128 on K and V take turns in one tile, as in
    MLX (separate tiles there cost 1.17x MLX's threadgroup memory at D = 128 and kept D = 256 at
    BQ = 16); below, separate tiles save two barriers per block and already take less memory
    than MLX's. BK is the largest of 32/16/8 whose tiles fit 32 KiB; a pitch pad of 16 bytes (to
    spread the transposed K reads over banks) is kept only where it still fits.
    """
    qk, vv = round_up8(dim_qk), round_up8(dim_v)
    size = _element_size(dtype)
    large = max(qk, vv) > 128
    shared = max(qk, vv) >= SHARED_KV_FROM_DIM
    for simdgroups in SIMDGROUP_CHOICES:
        for pad in (16 // size, 0):
            for key_block in KEY_BLOCK_CHOICES:
                config = BlockConfig(simdgroups, key_block, large, qk + pad, vv + pad, qk + pad, shared)
                if threadgroup_bytes(config, size) <= THREADGROUP_MEMORY_LIMIT:
                    return config
    raise ValueError(f"head dims ({dim_qk}, {dim_v}): no block configuration fits 32 KiB of threadgroup memory")


def _element_size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


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


def header_defines(header: str, prefix: str) -> dict[str, int]:
    """{name: value} of the `#define NAME <int>` lines of a shipped header whose names start with `prefix`."""
    text = (HERE / header).read_text()
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^#define\s+(" + prefix + r"\w+)\s+(-?\d+)\s*$", text, re.M)}


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


DEFINE_PREFIX = "MFA_"


def variant_source(variant, param_count: int) -> str:
    """The source compiled for a variant: its file (`SOURCE`) with local
    headers inlined and its #defines, each named MFA_ + the variant's name for it, placed after
    `#include <metal_stdlib>` (with_defines says why)."""
    from .emulator.runtime_select import with_defines

    return with_defines(kernel_source(variant.SOURCE),
                        variant_defines(variant, param_count))


def variant_defines(variant, param_count: int) -> dict:
    """The variant's #defines as the kernels name them: MFA_ + the variant's name for each."""
    return {DEFINE_PREFIX + name: value for name, value in variant.defines(param_count).items()}


def runtime_msl_version(device_type: str) -> str:
    """The MSL version kernels for this device type are compiled as: torch's rule for the running
    macOS on mps, the emulated target's on CPU tensors (emulator/targets.py holds the rule)."""
    if device_type == "mps":
        return _mps_msl_version()
    from .emulator.targets import current_target

    return current_target().msl_version


@lru_cache(maxsize=1)
def _mps_msl_version() -> str:
    """Fixed for the process (supports() asks on every call; platform.mac_ver() reads a plist file)."""
    from .emulator.targets import msl_version_for

    return msl_version_for(platform.mac_ver()[0] or "15", torch.__version__)


def runtime_compile_shader(device: torch.device):
    """torch.mps.compile_shader for mps tensors, the emulator's for CPU tensors."""
    if device.type == "mps":
        return torch.mps.compile_shader
    from .emulator import compile_shader

    return compile_shader


_libraries: dict = {}


def library_cache() -> dict:
    """The compiled-library cache as it is now (tests swap the module's dict; launch plans remember which one
    they were made with, so a swap invalidates them)."""
    return _libraries
_lock = threading.Lock()


def _runtime_key(device: torch.device) -> tuple:
    """What besides the variant selects the compiled code: under the emulator, the emulated macOS /
    torch pair and fast math (tests switch them within one process); torch fixes both for a process."""
    if device.type == "mps":
        return ("mps",)
    from .emulator.targets import current_target

    return (device.type, current_target())


def describe_variant(variant) -> str:
    fields = ", ".join(f"{f.name}={getattr(variant, f.name)}".replace("torch.", "") for f in dataclasses.fields(variant))
    return f"{variant.SOURCE}({fields})"


def library(variant, device: torch.device, param_count: int):
    """The compiled library of a variant on this device's runtime (compiled once per process).

    The variant names its source file (`SOURCE`) and its #defines. A compile
    failure raises KernelUnavailable (remembered: later calls do not recompile), and so does a
    launch the pipeline refuses or that fails: the op wrappers then hand the call to the torch
    backend unless MFA_BACKEND=metal (mfa_hf/kernel_fallback.py)."""
    key = (_runtime_key(device), variant)
    lib = _libraries.get(key)
    if lib is None:
        with _lock:
            lib = _libraries.get(key)
            if lib is None:
                lib = _libraries[key] = _compile(variant, device, param_count)
    if isinstance(lib, KernelUnavailable):
        raise lib
    return lib


_launch_targets: dict = {}
_current_target = None


def emulated_target():
    global _current_target
    if _current_target is None:  # imported on first use: the emulator is only needed off mps
        from .emulator.targets import current_target

        _current_target = current_target
    return _current_target()


def launch_target(ingredients: tuple, make_variant, device: torch.device, param_count: int):
    """(variant, library) of the variant `make_variant()` builds from `ingredients` (a plain tuple of
    the variant's fields), cached per (runtime, ingredients): a repeated call builds and hashes no
    variant dataclass. A variant that fails to compile raises from `library` each time (not cached here).
    The emulated target enters the key by identity (current_target keeps one object per target; the
    hit holds it, so an id is never reused for another): hashing the Target dataclass costs ~1 us."""
    device_type = device.type
    target = None if device_type == "mps" else emulated_target()
    key = (device_type, id(target), ingredients)
    hit = _launch_targets.get(key)
    if hit is None or hit[2] is not _libraries or hit[3] is not target:  # tests swap the library cache: follow it
        variant = make_variant()
        hit = _launch_targets[key] = (variant, library(variant, device, param_count), _libraries, target)
    return hit[0], hit[1]


def _compile(variant, device: torch.device, param_count: int):
    try:
        return CheckedLibrary(runtime_compile_shader(device)(variant_source(variant, param_count)), variant)
    except Exception as error:  # torch raises RuntimeError, the emulator MetalCompileError and others
        return KernelUnavailable("metal", describe_variant(variant), "compile", f"{type(error).__name__}: {error}")


class CheckedLibrary:
    """A compiled library whose kernels check their launch and report failures as KernelUnavailable."""

    def __init__(self, lib, variant):
        self._lib, self._variant, self._kernels = lib, variant, {}

    def __getattr__(self, name: str) -> "CheckedKernel":
        kernel = self._kernels.get(name)  # made once per kernel, not per launch
        if kernel is None:
            kernel = self._kernels[name] = CheckedKernel(getattr(self._lib, name), name, self._variant)
        return kernel


class CheckedKernel:
    def __init__(self, kernel, name: str, variant):
        self._kernel, self._name, self._variant = kernel, name, variant

    @property
    def max_threads_per_threadgroup(self) -> int | None:
        return getattr(self._kernel, "max_threads_per_threadgroup", None)

    def __call__(self, *args, group_size, **launch):
        limit = self.max_threads_per_threadgroup
        wanted = math.prod(group_size) if type(group_size) is not int else group_size
        if limit is not None and wanted > limit:
            raise self._unavailable(f"{self._name} is launched with {wanted} threads per threadgroup, its pipeline "
                                    f"allows {limit}")
        try:
            return self._kernel(*args, group_size=group_size, **launch)
        except RuntimeError as error:  # torch's launch errors; the emulator's runtime errors
            raise self._unavailable(f"{self._name}: {type(error).__name__}: {error}") from error

    def _unavailable(self, detail: str) -> KernelUnavailable:
        return KernelUnavailable("metal", describe_variant(self._variant), "launch", detail)


def cached_variants() -> list:
    return [variant for (_, variant), lib in _libraries.items() if not isinstance(lib, KernelUnavailable)]
