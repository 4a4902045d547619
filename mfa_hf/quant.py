"""Quantized K/V formats: codes + float scales that kernels dequantize block by block.

A `QuantizedKV` is a logical (B, S, H, D) tensor stored as
    codes   fp8_e4m3 / fp8_e5m2: uint8 (B, S, H, D), the bytes of torch.float8_e4m3fn / float8_e5m2
            int8:                int8  (B, S, H, D), symmetric (no zero point)
            nf4:                 uint8 (B, S, H, D // 2), two 4-bit codebook indices a byte:
                                 element 2i in the low nibble, element 2i + 1 in the high nibble
    scales  float32, 4-D, broadcastable to (B, S, H, D // group_size): value = decode(code) * scale.
            (B, S, H, 1) per (token, head), the default; (B or 1, 1, H, 1) per head;
            (B or 1, 1, H, D) per channel (group_size 1, for keys); nf4: (B, S, H, D // group_size).
Scales whose token dim is 1 are static: appending tokens reuses them (values saturate at the
format's range). Everything crosses the custom-op boundary as (codes, scales, format, group_size).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from enum import Enum

import torch

from . import kv_formats, scalars
from .problem import check_dense, fits_dim
from .kv_formats import NF4_LEVELS  # noqa: F401 (re-exported: the nf4 codebook, as before)

SCALE_DTYPE = torch.float32
NF4_GROUP_SIZES = kv_formats.spec("nf4").group_sizes

# One member per quantized format of mfa_hf.kv_formats (FP8_E4M3 = "fp8_e4m3", ...).
KVFormat = Enum("KVFormat", [(name.upper(), name) for name in kv_formats.QUANTIZED_NAMES], type=str, module=__name__)


def nf4_levels_from_quantiles() -> torch.Tensor:
    """QLoRA's construction: 8 positive and 7 negative normal quantiles, a zero, scaled to [-1, 1]."""
    offset = 0.5 * (1 / 32 + 1 / 30)  # QLoRA's choice: the mean of the two ends' quantile offsets
    positive = torch.special.ndtri(torch.linspace(1 - offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(1 - offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return levels / levels.abs().max()


def parse_format(kv_format) -> KVFormat:
    try:
        return KVFormat(kv_format)
    except ValueError:
        names = ", ".join(f.value for f in KVFormat)
        raise ValueError(f"format: expected one of {names}, got {kv_format!r}") from None


def storage_dim(fmt: KVFormat, dim: int) -> int:
    """Last dim of the codes tensor for a head dim of `dim`."""
    return kv_formats.spec(fmt).storage_dim(dim)


def code_dtype(fmt: KVFormat) -> torch.dtype:
    return kv_formats.spec(fmt).code_dtype


@dataclass(frozen=True)
class QuantizedKV:
    """A quantized (B, S, H, D) key or value tensor (see the module docstring for the layout).

    `dtype` is the logical dtype (what dequantize() returns and what attention outputs). Only
    transpose(1, 2) is supported as a view, for the (B, H, S, D) call shape of flash_attention: it gives a
    `heads_first` QuantizedKV, codes and scales (B, H, S, .), checked in that order (static scales, whose token
    dim is 1, are (B or 1, H, 1, G) there).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    format: KVFormat
    group_size: int
    dtype: torch.dtype = torch.float32
    heads_first: bool = False

    def __post_init__(self):
        object.__setattr__(self, "format", parse_format(self.format))
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"QuantizedKV.dtype: expected a float torch.dtype (the logical dtype), got {self.dtype!r}")
        # a numpy group size, checked, kept as a Python int
        if not isinstance(self.heads_first, bool):
            raise TypeError(f"QuantizedKV.heads_first: expected a bool, got {type(self.heads_first).__name__}")
        object.__setattr__(self, "group_size", check_parts(self.codes, self.scales, self.format, self.group_size,
                                                           "QuantizedKV", self.heads_first))

    @property
    def shape(self) -> torch.Size:
        b, s, h, _ = self.codes.shape
        return torch.Size((b, s, h, kv_formats.spec(self.format).logical_dim(self.codes.shape[-1])))

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def dim(self) -> int:
        return 4

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def transpose(self, dim0: int, dim1: int) -> "QuantizedKV":
        if sorted((dim0 % 4, dim1 % 4)) != [1, 2]:
            raise ValueError(f"QuantizedKV.transpose: expected dims (1, 2), got ({dim0}, {dim1})")
        return QuantizedKV(self.codes.transpose(1, 2), self.scales.transpose(1, 2), self.format,
                           self.group_size, self.dtype, not self.heads_first)

    def nbytes(self) -> int:
        """Bytes held by codes and scales (broadcast scales counted once)."""
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scales, self.format, self.group_size, dtype or self.dtype)


def check_parts(codes, scales, fmt, group_size: int, name: str, heads_first: bool = False) -> int:
    """Codes and scales agree with the format: errors name `name`, what was expected and what came. Returns the
    group size as a Python int (numpy ints are taken). heads_first: (B, H, S, .) rather than (B, S, H, .)."""
    fmt = parse_format(fmt)
    for part, t in (("codes", codes), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}.{part}: expected a torch.Tensor, got {type(t).__name__}")
        check_dense(t, f"{name}.{part}")
        if t.dim() != 4:
            raise ValueError(f"{name}.{part}: expected a 4-D tensor, got shape {tuple(t.shape)}")
    if codes.dtype != code_dtype(fmt):
        raise TypeError(f"{name}.codes: expected dtype {code_dtype(fmt)} for {fmt.value}, got {codes.dtype}")
    if scales.dtype != SCALE_DTYPE:
        raise TypeError(f"{name}.scales: expected dtype {SCALE_DTYPE}, got {scales.dtype}")
    if scales.device != codes.device:
        raise ValueError(f"{name}.scales: expected device {codes.device} like the codes, got {scales.device}")
    spec = kv_formats.spec(fmt)
    dim = spec.logical_dim(codes.shape[-1])
    expected = f"an int dividing the head dim {dim}"
    group_size = scalars.int_like(group_size, f"{name}.group_size", expected, ValueError)  # numpy ints too
    if group_size < 1 or dim % group_size:
        raise ValueError(f"{name}.group_size: expected {expected}, got {group_size!r}")
    if spec.grouped and group_size not in spec.group_sizes:
        raise ValueError(f"{name}.group_size: expected {spec.group_sizes_text()} for {fmt.value}, got {group_size}")
    groups = dim // group_size
    tokens_dim, heads_dim = (2, 1) if heads_first else (1, 2)
    b, s, h = codes.shape[0], codes.shape[tokens_dim], codes.shape[heads_dim]
    sb, ss, sh, sg = scales.shape[0], scales.shape[tokens_dim], scales.shape[heads_dim], scales.shape[3]
    want = f"({b} or 1, {h}, {s} or 1, {groups})" if heads_first else f"({b} or 1, {s} or 1, {h}, {groups})"
    if not fits_dim(sb, b) or not fits_dim(ss, s) or sh != h or sg != groups:
        raise ValueError(f"{name}.scales: expected shape {want} for {fmt.value} with group size {group_size}, "
                         f"got {tuple(scales.shape)}")
    return group_size


def quantize_kv(x: torch.Tensor, format="fp8_e4m3", *, group_size: int | None = None,
                granularity: str = "token", scales: torch.Tensor | None = None,
                layout: str = "bshd") -> QuantizedKV:
    """Quantize x (B, S, H, D) (or (B, H, S, D) with layout="bhsd") into `format`.

    granularity: "token" (a scale per (token, head), the default), "head" (one per (batch, head)
    over all tokens) or "channel" (one per (batch, head, d): keys' outlier channels; int8 and fp8).
    nf4 always uses absmax per group of `group_size` (32 or 64, default 64) along D.
    scales: reuse given static scales (per head/channel) instead of computing them, as an append does.
    """
    fmt = parse_format(format)
    check_dense(x, "x")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x: expected a 4-D float tensor, got {_describe(x)}")
    if not isinstance(layout, str) or layout not in ("bshd", "bhsd"):
        raise ValueError(f"layout: expected 'bshd' or 'bhsd', got {layout!r}")
    group_size = _group_size(fmt, granularity, group_size, x.shape[-1])
    if scales is not None:
        _check_given_scales(scales, x, layout, x.shape[-1] // group_size)
    if layout == "bhsd":  # quantized as (B, S, H, D) views, handed back as a (B, H, S, D) view
        x, scales = x.transpose(1, 2), None if scales is None else scales.transpose(1, 2)
    if scales is None:
        scales = absmax_scales(x, fmt, granularity, group_size)
    codes = encode(x, scales, fmt, group_size)
    packed = QuantizedKV(codes, scales, fmt, group_size, x.dtype)
    return packed.transpose(1, 2) if layout == "bhsd" else packed


def _group_size(fmt: KVFormat, granularity: str, group_size, dim: int) -> int:
    if not isinstance(granularity, str) or granularity not in ("token", "head", "channel"):
        raise ValueError(f"granularity: expected 'token', 'head' or 'channel', got {granularity!r}")
    if group_size is not None:
        group_size = scalars.int_like(group_size, "group_size", "an int or None", ValueError)  # as it always raised
    spec = kv_formats.spec(fmt)
    if spec.grouped:
        size = spec.default_group_size if group_size is None else group_size
        if size not in spec.group_sizes:
            raise ValueError(f"group_size: expected {spec.group_sizes_text()} for {fmt.value}, got {size!r}")
        if granularity != "token":
            raise ValueError(f"granularity: {fmt.value} scales are per group of {size} along D, got {granularity!r}")
        if dim % size:
            raise ValueError(f"x: expected a head dim divisible by the {fmt.value} group size {size}, got {dim}")
        return size
    natural = 1 if granularity == "channel" else dim
    if group_size is not None and group_size != natural:
        raise ValueError(f"group_size: {fmt.value} with granularity {granularity!r} uses {natural}, got {group_size}")
    return natural


def _check_given_scales(scales, x: torch.Tensor, layout: str, groups: int) -> None:
    """Static scales given to quantize_kv: float32 on x's device, broadcastable per the layout, > 0."""
    order = "(B, H, S, G)" if layout == "bhsd" else "(B, S, H, G)"
    if not isinstance(scales, torch.Tensor):
        raise TypeError(f"scales: expected a float32 tensor {order} or None, got {type(scales).__name__}")
    check_dense(scales, "scales")
    if scales.dtype != SCALE_DTYPE:
        raise TypeError(f"scales: expected dtype {SCALE_DTYPE}, got {scales.dtype}")
    if scales.device != x.device:
        raise ValueError(f"scales: expected device {x.device} like x, got {scales.device}")
    b, d1, d2, _ = x.shape
    heads_dim = 1 if layout == "bhsd" else 2
    want = [f"{b} or 1", f"{d1} or 1", f"{d2} or 1", str(groups)]
    want[heads_dim] = str(x.shape[heads_dim])
    shape = tuple(scales.shape)
    if len(shape) != 4 or not all(fits_dim(got, full) for got, full in zip(shape, x.shape[:3])) \
            or shape[heads_dim] != x.shape[heads_dim] or shape[3] != groups:
        raise ValueError(f"scales: expected shape {order} = ({', '.join(want)}), got {shape}")
    check_scale_values(scales, "scales")


def check_scale_values(scales: torch.Tensor, name: str) -> None:
    """Given scales must be finite and > 0 (a zero scale divides by zero: inf or NaN codes). This reads
    them back once (a device sync on mps/cuda); skipped while compiling and on meta (no values)."""
    if torch.compiler.is_compiling() or scales.is_meta or scales.numel() == 0:
        return
    bad = ~(torch.isfinite(scales) & (scales > 0))
    if bool(bad.any()):
        raise ValueError(f"{name}: expected finite values > 0, got {scales[bad].flatten()[0].item()} among them")


def scales_per_token(codes: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether a (B, S, H, .) cache's scales are per token (an append writes the new tokens' own) rather than static
    (an append reuses them): their token dim is the codes' and, on a one-position cache, so is their batch (static
    scales of batch 1 on a cache of several rows). One position and the codes' batch reads as per token:
    allocate_kv_cache refuses static scales there."""
    return scales.shape[1] == codes.shape[1] and (codes.shape[1] != 1 or scales.shape[0] == codes.shape[0])


_CHECKED_STATIC: dict[int, tuple] = {}  # id(scales) -> (weak reference, scales._version) of scales found valid


def check_static_scale_values(scales: torch.Tensor, name: str) -> None:
    """check_scale_values for the static scales of a cache that gets tokens, once per tensor and in-place change:
    a QuantizedKV built directly takes them unchecked, and a scale of 0 made every appended token 0 without a word.
    Checking at every append would read them back (a device sync) at every decode step."""
    if torch.compiler.is_compiling():
        return
    seen = _CHECKED_STATIC.get(id(scales))
    if seen is not None and seen[0]() is scales and seen[1] == scales._version:
        return
    check_scale_values(scales, name)
    if len(_CHECKED_STATIC) > 256:  # ids of dead tensors: their weak references no longer match
        _CHECKED_STATIC.clear()
    _CHECKED_STATIC[id(scales)] = (weakref.ref(scales), scales._version)


def absmax_scales(x: torch.Tensor, fmt: KVFormat, granularity: str, group_size: int) -> torch.Tensor:
    b, s, h, d = x.shape
    grouped = x.detach().to(torch.float32).abs().reshape(b, s, h, d // group_size, group_size)
    amax = grouped.amax(dim=-1)  # (B, S, H, G)
    if granularity != "token":
        amax = amax.amax(dim=1, keepdim=True) if s else amax.new_zeros(b, 1, h, amax.shape[-1])
        if granularity == "head":
            amax = amax.amax(dim=-1, keepdim=True)
    # An all-zero group keeps scale 1 (its codes are all zero) instead of dividing by zero. A group holding NaN or
    # inf gets a NaN scale: int8 and nf4 have no NaN code, so the whole group dequantizes to NaN and the NaN
    # propagates, as in the reference, instead of turning the group into zeros (kvcache_append.metal: the same).
    scales = torch.where(amax == 0, 1.0, amax / kv_formats.spec(fmt).code_max)
    scales.nan_to_num_(nan=math.nan, posinf=math.nan)
    return scales.to(SCALE_DTYPE).contiguous()


def encode(x: torch.Tensor, scales: torch.Tensor, fmt: KVFormat, group_size: int) -> torch.Tensor:
    """The codes of x (B, S, H, D) under given scales (values beyond the range saturate)."""
    b, s, h, d = x.shape
    scaled = x.to(torch.float32).reshape(b, s, h, d // group_size, group_size) / scales[..., None]
    return kv_formats.spec(fmt).encode(scaled.reshape(b, s, h, d))


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, fmt, group_size: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of (a block of) codes (B, S, H, Dc) with broadcastable scales, as (B, S, H, D) `dtype`.

    Kernels call this on one key block at a time; the whole cache is never dequantized.
    """
    fmt_spec = kv_formats.spec(KVFormat(fmt))
    # Integer codes go straight into the multiply, which promotes them to float32 in the same pass (the
    # same values as decoding first: int8 is exact in float32); other formats decode first.
    integer = fmt_spec.codes_per_byte == 1 and fmt_spec.float8_dtype is None and fmt_spec.codebook is None
    values = codes if integer else fmt_spec.decode(codes)
    b, s, h, d = values.shape
    grouped = values.reshape(b, s, h, d // group_size, group_size) * scales[..., None].to(torch.float32)
    return grouped.reshape(b, s, h, d).to(dtype)


def bytes_per_token_head(fmt, dim: int, group_size: int | None = None, granularity: str = "token") -> float:
    """Storage of one token of one head: codes plus its share of the scales (static scales: 0)."""
    fmt = parse_format(fmt)
    group_size = _group_size(fmt, granularity, group_size, dim)
    code_bytes = kv_formats.spec(fmt).storage_dim(dim)
    per_token_scales = dim // group_size if granularity == "token" else 0
    return code_bytes + per_token_scales * torch.finfo(SCALE_DTYPE).bits // 8


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
