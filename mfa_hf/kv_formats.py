"""One descriptor per KV-cache format: the single table every list, check, launcher and CLI reads.

A format's descriptor says what its codes are (dtype, codes per byte, largest code), how its scales
are laid out (one per token/head/channel, or per group along D with the allowed group sizes), the
number kernels know it by (Metal's MFA_K_FMT / MFA_V_FMT / MFA_FMT and dequant.h's FMT_*, Triton's
K_FMT / V_FMT), and how to encode scaled values into codes and decode them back (mfa_hf.quant
builds everything else on these). "none" is the plain (unquantized) cache, kernel id 0.

This module imports nothing from mfa_hf (only torch), so kernels and launchers can read it.
Adding a format: a descriptor here, then the kernels that should read it (see docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The 16 NormalFloat-4 levels of QLoRA (Dettmers et al. 2023, appendix E; the same table ships in
# bitsandbytes): quantiles of N(0, 1) normalized to [-1, 1], with an exact zero. They can be
# derived with mfa_hf.quant.nf4_levels_from_quantiles() (tests check the constants against it).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


@dataclass(frozen=True)
class KVFormatSpec:
    """A KV-cache format. Codes of a 4-bit format pack element 2i in the low nibble of byte i and
    2i + 1 in the high nibble."""

    name: str
    kernel_id: int                          # the number the Metal and Triton kernels take
    code_dtype: torch.dtype | None = None   # dtype of the codes tensor (None: the cache's own float dtype)
    codes_per_byte: int = 1
    code_max: float = 1.0                   # largest finite |code value|: a scale maps a group's absmax onto it
    float8_dtype: torch.dtype | None = None  # codes are the bytes of this torch float8 dtype
    codebook: tuple[float, ...] | None = None  # codes index this table of values
    group_sizes: tuple[int, ...] = ()       # () : a scale per (token, head), head or channel; else groups along D
    aliases: tuple[str, ...] = ()           # other names (mfa_hf.quant_compat's fp8_format)
    kernels: tuple[str, ...] = ("metal", "triton")  # backends whose kernels read it (torch reads every format)

    @property
    def quantized(self) -> bool:
        return self.code_dtype is not None

    @property
    def grouped(self) -> bool:
        """Scales per group of `group_sizes` along D, always per token (never static)."""
        return bool(self.group_sizes)

    @property
    def default_group_size(self) -> int | None:
        return max(self.group_sizes) if self.group_sizes else None

    def group_sizes_text(self) -> str:
        return " or ".join(str(g) for g in self.group_sizes)

    def storage_dim(self, dim: int) -> int:
        """Last dim of the codes tensor for a head dim of `dim`."""
        return dim // self.codes_per_byte

    def logical_dim(self, storage_dim: int) -> int:
        """Head dim of a codes tensor whose last dim is `storage_dim`."""
        return storage_dim * self.codes_per_byte

    def encode(self, scaled: torch.Tensor) -> torch.Tensor:
        """Codes of float32 values already divided by their scales (out-of-range values saturate)."""
        limit = self.code_max
        if self.float8_dtype is not None:
            # float8_e4m3fn has no infinity: clamp first so out-of-range values saturate, not NaN.
            return scaled.clamp(-limit, limit).to(self.float8_dtype).view(torch.uint8)
        if self.codebook is not None:
            return _pack(_nearest_level(scaled.clamp(-limit, limit), self.codebook), self.codes_per_byte)
        return _pack(scaled.round().clamp(-limit, limit).to(self.code_dtype), self.codes_per_byte)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 values (before scales) of codes, last dim unpacked to the logical head dim."""
        if self.float8_dtype is None and self.codebook is None:
            return _unpack(codes, self.codes_per_byte).to(torch.float32)
        # Each byte's values from a table of all 256: one gather. Converting float8 to float32 is slow on CPU,
        # and unpacking nibbles then indexing the codebook took four passes (nf4 decode at 4k keys: 37 ms).
        entries = torch.empty(codes.shape, dtype=_ENTRY_DTYPES[self.codes_per_byte], device=codes.device)
        values = _lookup(_byte_values(self, codes.device), codes, entries).view(torch.float32)
        return values.reshape(*codes.shape[:-1], codes.shape[-1] * self.codes_per_byte)

    def decode_into(self, codes: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """decode(codes) written into `out` (contiguous float32 of the decoded shape): codes of any layout are read
        once, in out's order (a heads-first copy of a (B, S, H, D) cache costs no extra pass)."""
        if self.float8_dtype is None and self.codebook is None:
            return out.copy_(_unpack(codes, self.codes_per_byte))  # int8: the copy converts exactly
        _lookup(_byte_values(self, codes.device), codes, out.view(_ENTRY_DTYPES[self.codes_per_byte]))
        return out

    def decode_bytes(self, codes: torch.Tensor) -> torch.Tensor:
        """decode() computed element by element (float8 conversion; nibbles into the codebook): the tables'
        source."""
        if self.float8_dtype is not None:
            return codes.view(self.float8_dtype).to(torch.float32)
        codes = _unpack(codes, self.codes_per_byte)
        if self.codebook is not None:
            return torch.tensor(self.codebook, dtype=torch.float32, device=codes.device)[codes.long()]
        return codes.to(torch.float32)


_BYTE_VALUES: dict = {}  # (format name, device) -> (256,) tables, see _byte_values
_ENTRY_DTYPES = {1: torch.float32, 2: torch.int64}  # codes per byte -> one entry holding that many float32


def _byte_values(fmt: KVFormatSpec, device) -> torch.Tensor:
    """The values of every byte of a float8 or codebook format, made once per device: a 1-D table whose entry i
    holds byte i's float32 values (two of them in one 8-byte entry for nf4: a 1-D gather of whole entries ran
    about 2x faster than one of (256, n) rows)."""
    key = (fmt.name, torch.device(device))
    table = _BYTE_VALUES.get(key)
    if table is None:
        every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(256, 1)
        values = fmt.decode_bytes(every_byte).reshape(256, fmt.codes_per_byte).contiguous()
        table = _BYTE_VALUES[key] = values.view(_ENTRY_DTYPES[fmt.codes_per_byte]).reshape(256).to(device)
    return table


def _lookup(table: torch.Tensor, codes: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """entries (contiguous, codes' shape) = table[codes], for codes of any layout (read once, in entries' order).

    torch.gather over the table broadcast to one row per row of codes runs on every intra-op thread; index_select
    of a 1-D table is one loop on one thread (nf4 bytes of a smollm-shaped side at 8k keys, 786k codes, 2 cores:
    about 270 us against 480)."""
    if codes.numel() == 0:
        return entries
    width = codes.shape[-1] if codes.dim() else 1
    index = torch.empty(codes.shape, dtype=torch.int64, device=codes.device).copy_(codes).view(-1, width)
    rows = table.view(1, -1).expand(index.shape[0], table.shape[0])
    torch.gather(rows, 1, index, out=entries.view(index.shape))
    return entries


def _nearest_level(values: torch.Tensor, levels: tuple[float, ...]) -> torch.Tensor:
    """uint8 index of the nearest of the sorted levels for each value (a tie goes to the lower level; NaN to the
    last): the number of midpoints between levels that a value is not <= to, i.e. torch.bucketize over the midpoints.
    Counted one midpoint at a time (15 comparisons for nf4, each over all values on every thread): bucketize's binary
    search is one loop on one thread (1.5M values, 2 cores: about 5.5 ms against 15-17 ms)."""
    table = torch.tensor(levels, dtype=values.dtype, device=values.device)
    midpoints = (table[1:] + table[:-1]) / 2  # in the values' dtype, as the comparisons read them
    found = torch.full(values.shape, len(levels) - 1, dtype=torch.uint8, device=values.device)
    for midpoint in midpoints:
        found.sub_((values <= midpoint).view(torch.uint8))
    return found


def _pack(indices: torch.Tensor, codes_per_byte: int) -> torch.Tensor:
    if codes_per_byte == 1:
        return indices
    pairs = indices.reshape(*indices.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _unpack(codes: torch.Tensor, codes_per_byte: int) -> torch.Tensor:
    if codes_per_byte == 1:
        return codes
    return torch.stack((codes & 0xF, codes >> 4), dim=-1).reshape(*codes.shape[:-1], codes.shape[-1] * 2)


NONE = KVFormatSpec("none", 0)
QUANTIZED = (
    KVFormatSpec("fp8_e4m3", 1, torch.uint8, code_max=448.0, float8_dtype=torch.float8_e4m3fn, aliases=("e4m3",)),
    KVFormatSpec("fp8_e5m2", 2, torch.uint8, code_max=57344.0, float8_dtype=torch.float8_e5m2, aliases=("e5m2",)),
    KVFormatSpec("int8", 3, torch.int8, code_max=127.0),
    KVFormatSpec("nf4", 4, torch.uint8, codes_per_byte=2, code_max=1.0, codebook=NF4_LEVELS, group_sizes=(32, 64)),
)
FORMATS = {f.name: f for f in (NONE, *QUANTIZED)}  # every format the kernels take, "none" first
QUANTIZED_NAMES = tuple(f.name for f in QUANTIZED)
CACHE_NAMES = tuple(FORMATS)  # "none" and the quantized names: what a KV cache may hold (CLI choices)


def spec(name) -> KVFormatSpec:
    """The descriptor of a format name (a KVFormat member is a str and works too)."""
    return FORMATS[name]


def by_alias(alias: str) -> KVFormatSpec | None:
    return next((f for f in QUANTIZED if alias in f.aliases), None)


def kernel_ids(backend: str) -> dict[str, int]:
    """{name: kernel id} of the formats `backend`'s kernels read (Metal: what dequant.h's FMT_<NAME> equal)."""
    return {f.name: f.kernel_id for f in FORMATS.values() if backend in f.kernels}


def unread(kv_format: str, backend: str) -> str | None:
    """The first format of a problem's kv_format ("k" or "k+v") that `backend`'s kernels do not read."""
    return next((name for name in kv_format.split("+") if name not in FORMATS or backend not in FORMATS[name].kernels),
                None)
