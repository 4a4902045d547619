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
from mfa_hf.kernel_fallback import KernelUnavailable
from ..contract import DecodeCall
from ..launch import SplitPolicy, decode_layout, lse_dtype, new_output, shape_and_strides

from .binding import FORMAT_CODES, LOG2E, bound_floats, bound_slopes, code_type, index_vector, placeholder, strides4
from . import loader
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


_plans: dict = {}  # launch key (see decode) -> _Plan


@dataclass(frozen=True)
class _Plan:
    """Everything of a decode launch but its tensors and scale scalars, remembered per launch key."""

    lib: object
    params: list  # DecodeParams, as passed (the kernels only read it)
    out_shape: tuple
    lse_shape: tuple
    part_shape: tuple | None  # split-K scratch (B, Hq, Lq, splits, Dv + 1): each split's row, then its LSE
    threads: tuple
    merge_threads: tuple
    libraries: dict  # loader.library_cache() when made (tests swap it: a plan follows)
    target: object  # the emulated target it was made for (None on mps)
    placeholders: tuple  # the device's (float, int) placeholders (binding.placeholder)


def _make_plan(call: DecodeCall, target) -> _Plan:
    q, keys, values, o = call.q, call.keys, call.values, call.options
    k_codes, v_codes = keys.codes, values.codes
    batch, lq, heads_q, dim_qk = q.shape
    capacity, heads_kv = k_codes.shape[1], k_codes.shape[2]
    group = heads_q // heads_kv
    dim_v = kv_formats.spec(values.format).logical_dim(v_codes.shape[-1])
    if capacity + lq * group >= 2**31:  # the kernel keeps keys, positions and rows in 32 bits
        raise ValueError(f"metal decode: cache capacity {capacity} and {lq * group} rows per KV head "
                         "exceed 32-bit positions")
    rows = rows_per_tile(group, lq, dim_qk, dim_v)
    tiles = math.ceil(group * lq / rows)
    splits = SPLITS.splits(batch * heads_kv * tiles, capacity, 1, call.num_splits)
    alibi = call.alibi_slopes
    slopes_stride = 0 if alibi is None or alibi.dim() == 1 else alibi.shape[-1]  # bound_slopes' (contiguous)
    o_head = heads_q * dim_v  # out.stride() and lse.stride(): both contiguous (new_output)
    params = [*strides4(q), *strides4(k_codes), *strides4(v_codes), *strides4(keys.scales), *strides4(values.scales),
              lq * o_head, o_head, dim_v, 1, heads_q * lq, lq, 1,
              slopes_stride, lq, heads_q, group, o.window_left, o.window_right, splits, keys.group_size,
              values.group_size, capacity, k_codes.shape[0]]
    ingredients = (q.dtype, dim_qk, dim_v, keys.format, values.format, rows, o.softcap > 0, alibi is not None,
                   call.sinks is not None, call.cache_batch_idx is not None, splits > 1)  # DecodeVariant's fields
    _, lib = launch_target(ingredients, lambda: DecodeVariant(*ingredients), q.device, len(DECODE_PARAM_FIELDS))
    threads = 32 * SIMDGROUPS
    return _Plan(lib, params, (batch, lq, heads_q, dim_v), (batch, heads_q, lq),
                 (batch, heads_q, lq, splits, dim_v + 1) if splits > 1 else None,
                 (threads * tiles * splits, heads_kv, batch), (32 * lq, heads_q, batch), loader.library_cache(), target,
                 (placeholder(q.device, torch.float32), placeholder(q.device, torch.int32)))



def _launch_key(call: DecodeCall, target) -> tuple:
    q, keys, values, o, alibi_slopes = call.q, call.keys, call.values, call.options, call.alibi_slopes
    k_codes, v_codes = keys.codes, values.codes
    return (q.device, id(target), q.dtype, q.shape, q.stride(), k_codes.shape, k_codes.stride(), v_codes.shape,
            v_codes.stride(), shape_and_strides(keys.scales), shape_and_strides(values.scales), keys.format,
            values.format, keys.group_size, values.group_size, o.window_left, o.window_right, o.softcap > 0,
            None if alibi_slopes is None else alibi_slopes.dim(), call.sinks is None, call.cache_batch_idx is None,
            call.num_splits)


def decode(call: DecodeCall):
    """The metal backend's decode (kernels/contract.py DecodeCall): vector kernel, split-K + merge.
    Per call: the launch key (shapes, strides, formats, group sizes, windows, feature flags,
    requested splits, dtype, device, emulated target; never a length) and its remembered _Plan, the
    output and split-K scratch allocation, the scales and the launches."""
    q, keys, values, o = call.q, call.keys, call.values, call.options
    alibi_slopes, sinks, cache_batch_idx = call.alibi_slopes, call.sinks, call.cache_batch_idx
    device, dtype, q_shape = q.device, q.dtype, q.shape
    target = None if device.type == "mps" else loader.emulated_target()
    key = _launch_key(call, target)
    batch, lq, heads_q = q_shape[0], q_shape[1], q_shape[2]
    if batch == 0 or lq == 0 or heads_q == 0:
        dim_v = kv_formats.spec(values.format).logical_dim(values.codes.shape[-1])
        return (new_output((batch, lq, heads_q, dim_v), dtype, device),
                new_output((batch, heads_q, lq), lse_dtype(dtype), device))
    plan = _plans.get(key)
    if plan is None or plan.libraries is not loader.library_cache() or plan.target is not target:
        if len(_plans) >= 4096:  # bounded (a growing cache changes its capacity, hence the key)
            _plans.clear()
        plan = _plans[key] = _make_plan(call, target)
    floats, ints = plan.placeholders
    slopes = floats if alibi_slopes is None else bound_slopes(alibi_slopes, device)[0]
    sink_logits = floats if sinks is None else bound_floats(sinks, device)
    rows = ints if cache_batch_idx is None else index_vector(cache_batch_idx, device)
    return _launch(plan, q, keys, values, index_vector(call.seqlens_k, device), rows, slopes, sink_logits, o)


def _launch(plan: _Plan, q, keys, values, lengths, rows, slopes, sink_logits, o) -> tuple:
    """Allocate out, lse and the split-K scratch, and launch the plan's decode kernel (and its merge)."""
    dtype, device, softcap, floats, lib = q.dtype, q.device, o.softcap, plan.placeholders[0], plan.lib
    out = new_output(plan.out_shape, dtype, device)
    lse = new_output(plan.lse_shape, lse_dtype(dtype), device)
    q_scale = o.scale / softcap if softcap > 0 else o.scale * LOG2E
    part = floats if plan.part_shape is None else torch.empty(plan.part_shape, dtype=torch.float32, device=device)
    lib.attention_decode(
        q, keys.codes, floats if keys.scales is None else keys.scales, values.codes,
        floats if values.scales is None else values.scales, lengths, rows, slopes, sink_logits, out, lse, part,
        plan.params, float(q_scale), float(softcap * LOG2E), threads=plan.threads, group_size=(32 * SIMDGROUPS, 1, 1))
    if plan.part_shape is not None:
        lib.attention_decode_merge(part, sink_logits, out, lse, plan.params, threads=plan.merge_threads,
                                   group_size=(32, 1, 1))
    return out, lse


def replay(call: DecodeCall):
    """After `decode(call)` ran: a function (q, keys, values, lengths) -> (out, lse), with CacheSides and an int32
    (B,) lengths vector as in DecodeCall, that launches the same library kernels with the same plan for later calls
    of this kind; or None where there is none (plain calls only: no row map, ALiBi, sinks or residual).

    The caller guarantees the shapes, dtypes, formats, device and options (mfa_hf/decode_plan.py's kind); the
    replay checks, per call, every stride, the scales' layout and group sizes (launch.decode_layout), the library
    cache and the emulated target. A launch the runtime refuses returns None: the full path then hands the call
    to the fallback backend, with its warning (mfa_hf/kernel_fallback.py).
    """
    q, keys, values, o = call.q, call.keys, call.values, call.options
    if (call.cache_batch_idx is not None or call.alibi_slopes is not None or call.sinks is not None
            or call.has_residual or call.num_splits or min(q.shape[0], q.shape[1], q.shape[2]) == 0
            or call.seqlens_k.dtype != torch.int32 or call.seqlens_k.device != q.device):
        return None
    device = q.device
    target = None if device.type == "mps" else loader.emulated_target()
    plan = _plans.get(_launch_key(call, target))
    libraries = loader.library_cache()
    if plan is None or plan.libraries is not libraries or plan.target is not target:
        return None
    layout, emulated, (floats, ints) = decode_layout(q, keys, values), target is not None, plan.placeholders

    def launch(q, keys, values, lengths):
        if (lengths.dtype != torch.int32 or decode_layout(q, keys, values) != layout
                or loader.library_cache() is not libraries or (emulated and loader.emulated_target() is not target)):
            return None
        try:
            return _launch(plan, q, keys, values, lengths.contiguous(), ints, floats, floats, o)
        except KernelUnavailable:
            return None

    return launch
