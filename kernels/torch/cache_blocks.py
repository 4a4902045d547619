"""Blocks of a (possibly quantized) KV cache, read for the torch backend's decode.

A block is the cache positions of one loop step (KeyRuns: equally spaced runs, one per split), heads
first and in the compute dtype. Quantized codes are taken as they are (1 byte or less an element) and
widened after, so the full-precision cache never exists beyond one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mfa_hf import kv_formats
from mfa_hf.quant import dequantize_codes

from ..contract import CacheSide


def side_block(side: CacheSide, window: "KeyRuns", rows: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Values of one cache side at the window's positions of the selected rows, heads first:
    (B, Hkv, runs * count, D) in `dtype`. Codes (1 byte or less an element) are taken as they are
    and widened after; a plain cache is taken and converted in one copy."""
    if side.format == "none":
        return _take(side.codes, window, rows, dtype, view_ok=True)  # straight into the matmuls
    codes = _take(side.codes, window, rows)  # contiguous: elementwise decoding of a view is slower
    scales = side.scales
    scale_rows = rows if scales.shape[0] > 1 else None
    if scales.shape[1] > 1:  # per token: the same positions
        scales = _take(scales, window, scale_rows)
    else:  # per head or static: broadcast along the positions
        scales = scales if scale_rows is None else scales.index_select(0, scale_rows)
        scales = scales.transpose(1, 2)
    return dequantize_codes(codes, scales, side.format, side.group_size, dtype)


def span_block(side: CacheSide, first: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """Values of positions [first, first + count) of every row of one cache side, heads first: (B, H, count, D)
    in `dtype`: a transposed view where the values need no copy, contiguous where a table decodes them. One slice
    of the cache, decoded where it lies (a slice along the positions keeps each row's codes together, so no gather
    or copy first)."""
    codes = side.codes[:, first:first + count]
    if side.format == "none":
        return codes.to(dtype).transpose(1, 2)
    scales = side.scales
    if scales.shape[1] > 1:  # per token: the same positions; per head or static: broadcast along them
        scales = scales[:, first:first + count]
    fmt = kv_formats.spec(side.format)
    if dtype != torch.float32 or fmt.codebook is None and fmt.float8_dtype is None:
        return dequantize_codes(codes, scales, side.format, side.group_size, dtype).transpose(1, 2)
    # Codes that decode through a table (nf4, fp8) are gathered straight into heads-first order, and scaled there:
    # torch's fused kernel reads a contiguous heads-first block faster than a transposed view (nf4 decode call,
    # smollm-shaped, over 8 layers' caches: 370 / 3090 us at 1k / 8k keys against 475 / 3540).
    batch, _, heads, _ = codes.shape
    out = torch.empty((batch, heads, count, fmt.logical_dim(codes.shape[-1])), dtype=torch.float32,
                      device=codes.device)
    fmt.decode_into(codes.transpose(1, 2), out)
    group = side.group_size
    grouped = out.view(batch, heads, count, out.shape[-1] // group, group)
    grouped.mul_(scales.transpose(1, 2).to(torch.float32)[..., None])
    return out


@dataclass(frozen=True)
class KeyRuns:
    """The cache positions of one loop step: run p (one per split) holds start + p * stride + t, t < count."""

    start: int
    stride: int
    runs: int
    count: int


def _take(cache: torch.Tensor, window: KeyRuns, rows: torch.Tensor | None,
          dtype: torch.dtype | None = None, view_ok: bool = False) -> torch.Tensor:
    """(B or len(rows), H, runs * count, D) of cache (B, S, H, D), heads first, in `dtype`.

    The runs are equally spaced, so they are one strided view of the cache: returned as it is when
    view_ok, the runs touch and nothing needs converting, otherwise read by a single copy (which also converts
    the dtype and lays the block out contiguously); never a gather. Positions past the cache's end
    (the last split's tail, always masked) read as 0.
    """
    batch, capacity, heads, dim = cache.shape
    dtype = cache.dtype if dtype is None else dtype
    sb, ss, sh, sd = cache.stride()
    tail = capacity - window.start - window.count  # run p lies inside the cache while p * stride <= tail
    inside = 0 if tail < 0 else min(window.runs, tail // window.stride + 1)
    if view_ok and window.stride == window.count and inside == window.runs and rows is None and dtype == cache.dtype:
        # back-to-back runs (each split fits one step): a view, no copy; matmul reads it strided
        return cache.as_strided((batch, heads, window.runs * window.count, dim), (sb, sh, ss, sd),
                                cache.storage_offset() + window.start * ss)
    out_batch = batch if rows is None else rows.numel()
    out = torch.empty((out_batch, heads, window.runs, window.count, dim), dtype=dtype, device=cache.device)

    def runs_view(first: int, runs: int, count: int) -> torch.Tensor:
        view = cache.as_strided((batch, heads, runs, count, dim), (sb, sh, window.stride * ss, ss, sd),
                                cache.storage_offset() + (window.start + first * window.stride) * ss)
        return view if rows is None else view.index_select(0, rows)

    if inside:
        out[:, :, :inside].copy_(runs_view(0, inside, window.count))
    for run in range(inside, window.runs):  # at most the last few splits reach past the end
        valid = max(0, min(window.count, capacity - (window.start + run * window.stride)))
        if valid:
            out[:, :, run : run + 1, :valid].copy_(runs_view(run, 1, valid))
        out[:, :, run, valid:].zero_()
    return out.reshape(out_batch, heads, window.runs * window.count, dim)


def values_dim(values: CacheSide) -> int:
    """The logical head dim of a value side (packed formats hold fewer code columns)."""
    return kv_formats.spec(values.format).logical_dim(values.codes.shape[-1])
