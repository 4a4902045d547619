"""Launching the Metal decode kernels (attention_decode.metal) for mfa_hf::metal_decode.

SPLITS (kernels/launch.py's policy) picks the split-K factor from the shape (batch, KV heads, row tiles, cache capacity),
never from the lengths, which stay on the device: one pass (the vector kernel) when the grid
already has enough threadgroups or the cache is short, else `splits` partial passes and a merge.
Nothing here synchronizes with the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from mfa_hf import kv_formats
from ..contract import DecodeCall
from ..launch import SplitPolicy, lse_dtype, new_output

from .binding import FORMAT_CODES, LOG2E, bound_floats, bound_slopes, code_type, index_vector, placeholder, strides4
from .loader import MSL_TYPES, header_fields, launch_target

DECODE_PARAM_FIELDS = (
    "q_stride_b", "q_stride_s", "q_stride_h", "q_stride_d",
    "k_stride_b", "k_stride_s", "k_stride_h", "k_stride_d",
    "v_stride_b", "v_stride_s", "v_stride_h", "v_stride_d",
    "ks_stride_b", "ks_stride_s", "ks_stride_h", "ks_stride_g",
    "vs_stride_b", "vs_stride_s", "vs_stride_h", "vs_stride_g",
    "o_stride_b", "o_stride_s", "o_stride_h", "o_stride_d",
    "lse_stride_b", "lse_stride_h", "lse_stride_s",
    "alibi_stride_b", "seqlen_q", "heads_q", "group", "window_left", "window_right", "num_splits",
    "k_group_size", "v_group_size", "capacity", "cache_rows",
)
_declared = header_fields("decode_params.h", "DecodeParams")
if _declared != DECODE_PARAM_FIELDS:
    raise ImportError(f"decode_params.h: expected DecodeParams fields {DECODE_PARAM_FIELDS}, got {_declared}")

SIMDGROUPS = 4  # WM: keys are spread over 4 simdgroups of 32 lanes
# Query rows per threadgroup: each costs DL + DVL + 2 floats per lane (q, o, m/l); 8 rows at
# D = 128 are 80 registers, and 4 rows at D = 256 the same.
MAX_ROWS_SMALL_D, MAX_ROWS_LARGE_D = 8, 4
# Split-K (kernels/launch.py): enough threadgroups to fill a GPU (Apple M-series: 8-40 cores, several
# threadgroups each); each split reads the cache capacity's share (an upper bound of every length).
SPLITS = SplitPolicy(target_work=128)


@dataclass(frozen=True)
class DecodeVariant:
    """Everything that changes the decode kernels' code: the library cache key (never a length)."""

    SOURCE: ClassVar[str] = "attention_decode.metal"
    dtype: torch.dtype
    dim_qk: int
    dim_v: int
    k_format: str
    v_format: str
    rows: int
    softcap: bool = False
    alibi: bool = False
    sinks: bool = False
    batch_idx: bool = False
    split: bool = False

    def defines(self, param_count: int) -> dict:
        return {
            "IN_T": MSL_TYPES[self.dtype], "K_T": code_type(self.k_format, self.dtype),
            "V_T": code_type(self.v_format, self.dtype),
            "K_FMT": FORMAT_CODES[self.k_format], "V_FMT": FORMAT_CODES[self.v_format],
            "DQK": self.dim_qk, "DV": self.dim_v, "ROWS": self.rows, "WM": SIMDGROUPS,
            "HAS_SOFTCAP": self.softcap, "HAS_ALIBI": self.alibi, "HAS_SINKS": self.sinks,
            "HAS_BATCH_IDX": self.batch_idx, "SPLIT": self.split, "DECODE_PARAM_COUNT": param_count,
        }


def rows_per_tile(group: int, lq: int, dim_qk: int, dim_v: int) -> int:
    limit = MAX_ROWS_SMALL_D if max(dim_qk, dim_v) <= 128 else MAX_ROWS_LARGE_D
    return max(1, min(group * lq, limit))


_plans: dict = {}  # (q shape, codes shape, V codes' last dim, V format, requested splits) -> _plan(...)


def _plan(q_shape, k_shape, v_storage_dim: int, v_format: str, requested: int) -> tuple:
    """(group, dim_v, rows per tile, tiles, splits) of a decode shape: shapes only, never a length."""
    batch, lq, heads_q, dim_qk = q_shape
    heads_kv = k_shape[2]
    group = heads_q // heads_kv
    dim_v = kv_formats.spec(v_format).logical_dim(v_storage_dim)
    rows = rows_per_tile(group, lq, dim_qk, dim_v)
    tiles = math.ceil(group * lq / rows)
    splits = SPLITS.splits(batch * heads_kv * tiles, k_shape[1], 1, requested)
    return group, dim_v, rows, tiles, splits


def decode(call: DecodeCall):
    """The metal backend's decode (kernels/contract.py DecodeCall): vector kernel, split-K + merge.
    The shape-only plan (rows per tile, tiles, splits) is remembered per shape; out and lse are
    contiguous (new_output), so their strides follow from the shape."""
    q, keys, values, o = call.q, call.keys, call.values, call.options
    k_codes, k_scales, k_format, k_group_size = keys.codes, keys.scales, keys.format, keys.group_size
    v_codes, v_scales, v_format, v_group_size = values.codes, values.scales, values.format, values.group_size
    alibi_slopes, sinks, cache_batch_idx = call.alibi_slopes, call.sinks, call.cache_batch_idx
    scale, softcap = o.scale, o.softcap
    q_shape, k_shape, v_storage_dim = q.shape, k_codes.shape, v_codes.shape[-1]
    batch, lq, heads_q, dim_qk = q_shape
    key = (q_shape, k_shape, v_storage_dim, v_format, call.num_splits)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= 4096:  # bounded (a growing cache changes its capacity, hence the key)
            _plans.clear()
        plan = _plans[key] = _plan(*key)
    group, dim_v, rows, tiles, splits = plan
    device, dtype = q.device, q.dtype
    out = new_output((batch, lq, heads_q, dim_v), dtype, device)
    lse = new_output((batch, heads_q, lq), lse_dtype(dtype), device)
    if batch == 0 or lq == 0 or heads_q == 0:
        return out, lse
    capacity = k_shape[1]
    if capacity + lq * group >= 2**31:  # the kernel keeps keys, positions and rows in 32 bits
        raise ValueError(f"metal decode: cache capacity {capacity} and {lq * group} rows per KV head "
                         "exceed 32-bit positions")
    if alibi_slopes is None:
        slopes, slopes_stride = placeholder(device, torch.float32), 0
    else:
        slopes, slopes_stride = bound_slopes(alibi_slopes, device)
    o_head = heads_q * dim_v  # out.stride() and lse.stride(): both contiguous
    params = [*strides4(q), *strides4(k_codes), *strides4(v_codes), *strides4(k_scales), *strides4(v_scales),
              lq * o_head, o_head, dim_v, 1, heads_q * lq, lq, 1,
              slopes_stride, lq, heads_q, group, o.window_left, o.window_right, splits, k_group_size, v_group_size,
              capacity, k_shape[0]]
    q_scale = scale / softcap if softcap > 0 else scale * LOG2E
    ingredients = (dtype, dim_qk, dim_v, k_format, v_format, rows, softcap > 0, alibi_slopes is not None,
                   sinks is not None, cache_batch_idx is not None, splits > 1)  # DecodeVariant's fields
    _, lib = launch_target(ingredients, lambda: DecodeVariant(*ingredients), device, len(DECODE_PARAM_FIELDS))
    floats = placeholder(device, torch.float32)
    sink_logits = floats if sinks is None else bound_floats(sinks, device)
    part_out, part_lse = floats, floats
    if splits > 1:
        part_out = torch.empty((batch, heads_q, lq, splits, dim_v), dtype=torch.float32, device=device)
        part_lse = torch.empty((batch, heads_q, lq, splits), dtype=torch.float32, device=device)
    threads = 32 * SIMDGROUPS
    lib.attention_decode(
        q, k_codes, floats if k_scales is None else k_scales, v_codes, floats if v_scales is None else v_scales,
        index_vector(call.seqlens_k, device), index_vector(cache_batch_idx, device), slopes, sink_logits,
        out, lse, part_out, part_lse, params, float(q_scale), float(softcap * LOG2E),
        threads=(threads * tiles * splits, k_shape[2], batch), group_size=(threads, 1, 1))
    if splits > 1:
        lib.attention_decode_merge(part_out, part_lse, sink_logits, out, lse, params,
                                   threads=(32 * lq, heads_q, batch), group_size=(32, 1, 1))
    return out, lse
