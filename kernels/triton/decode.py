"""Launching the triton decode kernels (decode_kernel.py) over a (possibly quantized) KV cache: split-K + merge.

The split count comes from the shape (batch x KV heads x query tiles, visible key span), never from the
lengths, which the kernels read on the device: no host read, no recompile per length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mfa_hf import kv_formats

from ..contract import DecodeCall
from ..launch import BoundedMemo, SplitPolicy, decode_layout, new_output, shape_and_strides

from . import decode_kernel
from .binding import alibi_args, cuda_capability_at_least, dot_precision, on_tensors_device, softcap_mode
from .blocks import cdiv, padded_dim
from .direct_launch import DirectLauncher, tensor_classes
from .forward import launches_unchanged

# Kernels relaunched without Triton's per-call binding once compiled for a kind of call (direct_launch.py).
_SPLIT = DirectLauncher(decode_kernel.decode_split_kernel)
_MERGE = DirectLauncher(decode_kernel.decode_merge_kernel)


# Split-K choice (kernels/launch.py's SplitPolicy), from the shape only (batch x KV heads x query tiles,
# visible key span): at most PROGRAMS_PER_SM x SMs programs.
PROGRAMS_PER_SM = 8
# GPU launch config of the split kernel; the benchmark may override (decode_config).
DECODE_CONFIG = dict(block_n=64, num_warps=4, num_stages=3)
# Quantized caches: H100 64k sweep (2026-11-21), packed conversions: 128 keys, 4 warps, 3 stages best for
# every format (64 keys 7-27% slower, 8 warps 37-48% slower).
DECODE_CONFIG_QUANT = dict(block_n=128, num_warps=4, num_stages=3)
# keys_as_rows (a config switch, off): the split kernel's key tile as the MMA's M side. H100, session 21
# (benchmarks/triton/decode_layouts.py): Triton takes Hopper's warp-group MMA but spills 74-160 registers; int8 at
# 64k 3.8x slower, nf4 1.6x, bf16 even. Kept to re-time with a later Triton.
_levels_cache: dict = {}



# fp8_e5m2 scales are absmax / 57344: the probabilities times such a scale fall below float16's normal range (about
# 6e-5) before the value dot, and lost up to 1.4x the allowed error against the reference (found by a layout sweep).
# They are lifted by 2^8 (exact) and the output divided by it (V_OUT) in float32.
E5M2_LIFT = 256.0


def _v_const(v_format: str, e4m3: float) -> float:
    if v_format == "fp8_e4m3":
        return e4m3
    return E5M2_LIFT if v_format == "fp8_e5m2" else 1.0


def _asm_ok(device) -> bool:
    """Packed inline-PTX code conversions (decode_kernel.py): CUDA, compute capability >= 8.9 (fp8 cvt)."""
    return cuda_capability_at_least(device, (8, 9))


def _levels(device, dtype):
    """The 16 nf4 levels in the dtype of the dots (float16 on the GPU: gathered without conversion)."""
    key = (str(device), dtype)
    if key not in _levels_cache:
        levels = kv_formats.spec("nf4").codebook
        _levels_cache[key] = torch.tensor(levels, dtype=torch.float32, device=device).to(dtype)
    return _levels_cache[key]


def split_policy(device) -> SplitPolicy:
    """The split policy for `device`: its SM count (cached per device); the interpreter gets a few
    splits of small blocks, so that the merge path is exercised."""
    if device.type != "cuda":
        return SplitPolicy(target_work=16, min_keys=16)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _policies:
        sms = torch.cuda.get_device_properties(index).multi_processor_count
        _policies[index] = SplitPolicy(target_work=PROGRAMS_PER_SM * sms)
    return _policies[index]


_policies: dict = {}


def _scale_args(scales, codes, fmt, group_size):
    """(tensor, (batch, token, head, group) strides, mode, group size, groups).

    mode 1: one scale per (token or static) row, 2: per group of D applied element-wise (int8/fp8
    per channel), 3: nf4 groups (applied per group around the dots).
    """
    if fmt == "none":
        return codes, (0, 0, 0, 0), 0, 2, 1
    full = scales.expand(codes.shape[0], codes.shape[1], codes.shape[2], scales.shape[-1])
    groups = scales.shape[-1]
    mode = 1 if groups == 1 else (3 if kv_formats.spec(fmt).grouped else 2)
    return full, tuple(full.stride()), mode, group_size, groups


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()



@dataclass(frozen=True)
class _Plan:
    """Everything of a decode launch but its tensors and the two float scalars, made once per launch key
    (see decode): on the H200 host the arithmetic below cost more than Triton's own launch."""

    out_shape: tuple
    lse_shape: tuple
    part_sizes: Optional[tuple]  # split-K scratch (normalized rows, LSEs), None with one split
    levels: torch.Tensor
    split_grid: tuple
    split_ints: tuple  # the integer arguments between the tensors and (scale, softcap)
    split_tail: tuple  # the integer arguments after them
    split_options: dict
    merge_grid: tuple
    merge_ints: tuple
    merge_options: dict


_plans = BoundedMemo()  # launch key -> _Plan (bounded)


def _make_plan(call: DecodeCall, config) -> _Plan:
    q, keys, values, o = call.q, call.keys, call.values, call.options
    k_codes, v_codes, k_format, v_format = keys.codes, values.codes, keys.format, values.format
    window_left, right = o.window_left, o.window_right
    batch, lq, heads_q, dim = q.shape
    heads_kv = k_codes.shape[2]
    group = heads_q // heads_kv
    k_spec, v_spec = kv_formats.spec(k_format), kv_formats.spec(v_format)
    dim_v = v_spec.logical_dim(v_codes.shape[-1])
    quant = k_format != "none" or v_format != "none"
    cfg = dict(DECODE_CONFIG_QUANT if quant else DECODE_CONFIG, **(config or {}))
    on_gpu = q.device.type == "cuda"
    block_n = cfg["block_n"] if on_gpu else 16
    max_rows = 64 if on_gpu else 16
    block_q = min(_pow2(lq), 1 << (max(1, max_rows // group).bit_length() - 1))  # power of two <= rows / G
    block_m = max(16, _pow2(group * block_q))
    # Packed PTX conversions (decode_kernel.py). Not for nf4 under float32 q: its levels would be float16-rounded
    # (the integer and fp8 conversions are exact).
    asm = _asm_ok(q.device) and bool(cfg.get("asm", True)) and not (
        q.dtype == torch.float32 and (k_spec.codebook or v_spec.codebook))
    q_tiles = cdiv(lq, block_q)
    span = k_codes.shape[1]
    if window_left >= 0 and right >= 0:
        span = min(span, window_left + right + block_q)
    splits = split_policy(q.device).splits(batch * heads_kv * q_tiles, span, block_n, call.num_splits)
    direct = splits == 1
    _, k_scale_strides, k_mode, k_gs, k_ng = _scale_args(keys.scales, k_codes, k_format, keys.group_size)
    _, v_scale_strides, v_mode, v_gs, v_ng = _scale_args(values.scales, v_codes, v_format, values.group_size)
    _, slope_strides = alibi_args(call.alibi_slopes, q)
    head_d, head_dv = k_spec.storage_dim(dim), v_spec.storage_dim(dim_v)
    e4m3 = 1.0 if asm else 256.0  # decode_kernel.py's integer e4m3 decode yields value / 256
    precision = dot_precision(q.dtype, q.device)
    # out (B, Lq, Hq, Dv) and lse (B, Hq, Lq) are allocated contiguous (new_output).
    out_strides = (lq * heads_q * dim_v, heads_q * dim_v, dim_v)
    lse_strides = (heads_q * lq, lq)
    split_ints = (*q.stride(), *k_codes.stride(), *v_codes.stride(), *k_scale_strides, *v_scale_strides,
                  *out_strides, *lse_strides, *slope_strides,
                  lq, heads_kv, group, splits, max(window_left, 0), max(right, 0))
    sinks_on = call.sinks is not None
    split_options = dict(
        HEAD_D=head_d, HEAD_DV=head_dv, BLOCK_D=padded_dim(head_d), BLOCK_DV=padded_dim(head_dv),
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, K_FMT=k_spec.kernel_id,
        V_FMT=v_spec.kernel_id, K_SCALE=k_mode, V_SCALE=v_mode,
        K_CONST=e4m3 if k_format == "fp8_e4m3" else 1.0, V_CONST=_v_const(v_format, e4m3),
        V_OUT=E5M2_LIFT ** -1 if v_format == "fp8_e5m2" else 1.0,
        K_GS=k_gs, V_GS=v_gs, K_NG=k_ng, V_NG=v_ng,
        HAS_BATCH_IDX=call.cache_batch_idx is not None, HAS_LEFT=window_left >= 0, HAS_RIGHT=right >= 0,
        SOFTCAP=softcap_mode(o.softcap, q.dtype, q.device), ALIBI=call.alibi_slopes is not None, SINKS_ON=sinks_on, DIRECT=direct,
        DOT_PRECISION=precision, ASM=asm, KEYS_AS_ROWS=bool(cfg.get("keys_as_rows", False)), num_warps=cfg["num_warps"] if on_gpu else 1,
        num_stages=cfg["num_stages"] if on_gpu else 1)
    merge_options = dict(HEAD_DV=dim_v, BLOCK_DV=padded_dim(dim_v), BLOCK_P=max(16, _pow2(splits)), SINKS_ON=sinks_on,
                         num_warps=4 if on_gpu else 1)
    rows = batch * heads_q * lq
    return _Plan(
        (batch, lq, heads_q, dim_v), (batch, heads_q, lq), None if direct else (rows * splits * dim_v, rows * splits),
        _levels(q.device, torch.float32 if precision == "upcast" or q.dtype == torch.float32 else torch.float16),
        (splits, batch * heads_kv, q_tiles), split_ints,
        (max(1, k_codes.shape[0]), k_codes.shape[1]), split_options, (rows,),
        (*out_strides, *lse_strides, lq, heads_q, splits), merge_options)


def _launch_key(call: DecodeCall, config) -> tuple:
    q, keys, values, o = call.q, call.keys, call.values, call.options
    k_codes, v_codes = keys.codes, values.codes
    return (q.device, q.dtype, q.shape, q.stride(), k_codes.dtype, k_codes.shape, k_codes.stride(), v_codes.dtype,
            v_codes.shape, v_codes.stride(), shape_and_strides(keys.scales), shape_and_strides(values.scales),
            keys.format, values.format, keys.group_size, values.group_size, o.window_left, o.window_right,
            o.softcap > 0, shape_and_strides(call.alibi_slopes), call.sinks is None, call.cache_batch_idx is None,
            call.num_splits, None if config is None else tuple(sorted(config.items())))


def _outputs(plan: _Plan, dtype, device) -> tuple:
    """(out, lse, partial outputs, partial LSEs): with one split the kernel writes out/lse itself, and lse stands in
    for the unused partials."""
    out = new_output(plan.out_shape, dtype, device)
    lse = new_output(plan.lse_shape, torch.float32, device)
    if plan.part_sizes is None:
        return out, lse, lse, lse
    return (out, lse, torch.empty(plan.part_sizes[0], dtype=torch.float32, device=device),
            torch.empty(plan.part_sizes[1], dtype=torch.float32, device=device))


def _split_args(plan: _Plan, q, keys, values, lengths, rows, slopes, sinks, out, lse, part_o, part_lse, o) -> tuple:
    """The split kernel's arguments; its 14 tensors first (rows, slopes, sinks: q where absent)."""
    return (q, keys.codes, values.codes, _scales_arg(keys), _scales_arg(values), lengths, rows, slopes, sinks,
            plan.levels, out, lse, part_o, part_lse, *plan.split_ints, float(o.scale), float(o.softcap),
            *plan.split_tail)


def _scales_arg(side):
    """A side's scales as the kernel binds them, read through the strides of their expansion to (B, S, H, groups):
    the same pointer. A plain cache's codes stand in for its absent scales."""
    return side.codes if side.format == "none" else side.scales


@on_tensors_device
def decode(call: DecodeCall, config=None):
    """The triton decode (kernels/contract.py DecodeCall); config overrides DECODE_CONFIG (benchmarks).
    Per call: the launch key (shapes, strides, dtypes, formats, group sizes, windows, feature flags,
    requested splits, config; never a length) and its remembered _Plan, the allocations, the launches."""
    q, keys, values, o = call.q, call.keys, call.values, call.options
    alibi_slopes, sinks, cache_batch_idx = call.alibi_slopes, call.sinks, call.cache_batch_idx
    key = _launch_key(call, config)
    if q.shape[0] == 0 or q.shape[1] == 0:
        dim_v = kv_formats.spec(values.format).logical_dim(values.codes.shape[-1])
        return (new_output((q.shape[0], q.shape[1], q.shape[2], dim_v), q.dtype, q.device),
                new_output((q.shape[0], q.shape[2], q.shape[1]), torch.float32, q.device))
    plan = _plans.get(key) or _plans.keep(key, _make_plan(call, config))
    out, lse, part_o, part_lse = _outputs(plan, q.dtype, q.device)
    sink_arg = q if sinks is None else sinks
    _SPLIT.launch(plan.split_grid, _split_args(
        plan, q, keys, values, call.seqlens_k, q if cache_batch_idx is None else cache_batch_idx,
        q if alibi_slopes is None else alibi_slopes, sink_arg, out, lse, part_o, part_lse, o),
        plan.split_options, known=key, tensors=14)
    if plan.part_sizes is not None:
        _MERGE.launch(plan.merge_grid, (part_o, part_lse, sink_arg, out, lse, *plan.merge_ints), plan.merge_options,
                      known=key, tensors=5)
    return out, lse


def replay(call: DecodeCall):
    """After `decode(call)` ran: a function (q, keys, values, lengths) -> (out, lse), with CacheSides and an int32
    (B,) lengths vector as in DecodeCall, that launches the same compiled kernels with the same plan for later
    calls of this kind; or None where there is none: plain calls only (no row map, ALiBi, sinks or residual), on
    CUDA, with 16-byte aligned tensors.

    The caller guarantees the shapes, dtypes, formats, devices and options (mfa_hf/decode_plan.py's kind). The
    replay checks, per call, the rest of what the launch depends on: every stride and the scales' layout and
    group sizes, 16-byte alignment, the current CUDA device, and the launch switches (forward.py); when one
    differs it returns None and the caller takes the full path.
    """
    q, keys, values = call.q, call.keys, call.values
    if (call.cache_batch_idx is not None or call.alibi_slopes is not None or call.sinks is not None
            or call.has_residual or call.num_splits or q.device.type != "cuda"
            or q.device.index != torch.cuda.current_device()):
        return None
    key = _launch_key(call, None)
    plan = _plans.get(key)
    if plan is None or call.seqlens_k.dtype != torch.int32 or _misaligned(q, keys, values, call.seqlens_k):
        return None
    index, device = q.device.index, q.device
    # The argument kinds decode() launched with: its 14 tensors, with q for the absent row map, slopes and sinks.
    out, lse, part_o, part_lse = _outputs(plan, q.dtype, device)
    split_args = _split_args(plan, q, keys, values, call.seqlens_k, q, q, q, out, lse, part_o, part_lse, call.options)
    split = _SPLIT.runner(index, plan.split_grid, key, tensor_classes(split_args[:14]))
    merge = None
    if plan.part_sizes is not None:
        merge = _MERGE.runner(index, plan.merge_grid, key, tensor_classes((part_o, part_lse, q, out, lse)))
        if merge is None:
            return None
    if split is None:
        return None
    (run_split, split_tail), o, layout, unchanged = split, call.options, _layout(q, keys, values), launches_unchanged()

    def launch(q, keys, values, lengths):
        if (lengths.dtype != torch.int32 or _layout(q, keys, values) != layout or _misaligned(q, keys, values, lengths)
                or not unchanged()):
            return None
        out, lse, part_o, part_lse = _outputs(plan, q.dtype, device)
        run_split(*_split_args(plan, q, keys, values, lengths, q, q, q, out, lse, part_o, part_lse, o), *split_tail)
        if merge is not None:
            run_merge, merge_tail = merge
            run_merge(part_o, part_lse, q, out, lse, *plan.merge_ints, *merge_tail)
        return out, lse

    return launch


def _layout(q, keys, values) -> tuple:
    return decode_layout(q, keys, values), torch.cuda.current_device()


def _misaligned(q, keys, values, lengths) -> int:
    pointer = q.data_ptr() | keys.codes.data_ptr() | values.codes.data_ptr() | lengths.data_ptr()
    for side in (keys, values):
        if side.format != "none":
            pointer |= side.scales.data_ptr()
    return pointer & 15
