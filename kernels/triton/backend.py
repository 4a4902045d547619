"""The `triton` backend: Triton kernels for CUDA tensors (forward, backward, every dense/varlen feature).

Importing this module imports triton; where triton is missing the ImportError makes dispatch report
the backend unavailable with that reason. With TRITON_INTERPRET=1 in the environment before triton
is imported, the same kernels serve CPU tensors through Triton's interpreter (how CI tests them on
machines without a GPU; tests/triton starts such a process itself).
"""

from __future__ import annotations

import functools

import torch
import triton

from mfa_hf import kv_formats
from mfa_hf.kernels.dropout import MASK32, drop_threshold
from mfa_hf.problem import AttentionProblem

from ..contract import AttentionCall, BackendDefinition, DecodeCall, Gradients
from ..launch import SplitPolicy, empty_grads, empty_result, new_output

from . import backward_kernel as _compiled_backward
from . import decode_kernel as _compiled_decode
from . import forward_kernel as _compiled_forward
from .blocks import backward_kv_blocks, backward_q_blocks, cdiv, forward_blocks, interpreting, padded_dim

NAME = "triton"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DECODE_FORMATS = tuple(kv_formats.kernel_ids("triton"))  # the formats decode.py reads


INT32_LIMIT = 2**31  # elements a 32-bit offset reaches (2**31 - 1 is the largest offset)


def supports(problem: AttentionProblem) -> tuple[bool, str]:
    devices = ("cuda", "cpu") if interpreting() else ("cuda",)
    if problem.device_type not in devices:
        return False, f"the triton backend serves cuda tensors, got {problem.device_type}"
    if problem.dtype not in DTYPES:
        return False, f"the triton kernels take float16, bfloat16 or float32, got {problem.dtype}"
    if problem.largest_span > INT32_LIMIT:
        return False, (f"the triton kernels index tensors with 32-bit offsets, and this call reaches element "
                       f"{problem.largest_span - 1} (2**31 or more; the torch backend serves it)")
    if problem.kv_format != "none":
        unknown = kv_formats.unread(problem.kv_format, "triton")
        if unknown:
            return False, f"the triton decode kernel reads {', '.join(DECODE_FORMATS)} caches, got {unknown}"
    return True, "the triton kernels serve this problem"


def _kernels(device: torch.device):
    """(forward module, backward module). Under TRITON_INTERPRET=1 they run CPU tensors in numpy."""
    return _compiled_forward, _compiled_backward


# ---------------------------------------------------------------------------------------------
# Argument plumbing: every tensor is addressed through strides, broadcast dimensions with stride 0.

def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, seq, head, dim) strides; a packed (T, H, D) tensor has batch stride 0."""
    return tuple(t.stride()) if t.dim() == 4 else (0, *t.stride())


def _lse_strides(lse: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of (B, Hq, Lq) or packed (Hq, Tq)."""
    return tuple(lse.stride()) if lse.dim() == 3 else (0, *lse.stride())


def _mask_args(attn_mask, q, batch: int, lq: int, lk: int):
    if attn_mask is None:
        return q, (0, 0, 0, 0), 0
    mask = attn_mask.view(torch.uint8) if attn_mask.dtype == torch.bool else attn_mask
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(batch, q.shape[-2], lq, lk)
    return mask, tuple(mask.stride()), 1 if attn_mask.dtype == torch.bool else 2


def _alibi_args(alibi_slopes, q):
    if alibi_slopes is None:
        return q, (0, 0)
    if alibi_slopes.dim() == 1:
        return alibi_slopes, (0, alibi_slopes.stride(0))
    return alibi_slopes, tuple(alibi_slopes.stride())


def _dropout_args(dropout_p: float, dropout_seed):
    if dropout_p == 0:
        return 0, 0, 1.0
    return int(dropout_seed.item()) & MASK32, drop_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32:
        return "ieee"  # tf32 would carry ~1e-3 relative error: float32 callers expect float32 accuracy
    return "upcast" if device.type == "cpu" and dtype == torch.bfloat16 else "tf32"


def _common_meta(call: AttentionCall):
    q, v, attn_mask, o = call.q, call.v, call.attn_mask, call.options
    window_left, right, softcap = o.window_left, o.window_right, o.softcap
    return dict(
        HEAD_DQK=q.shape[-1], HEAD_DV=v.shape[-1], BLOCK_DQK=padded_dim(q.shape[-1]),
        BLOCK_DV=padded_dim(v.shape[-1]), HAS_LEFT=window_left >= 0, HAS_RIGHT=right >= 0,
        SOFTCAP=softcap > 0,
        MASK_KIND=0 if attn_mask is None else (1 if attn_mask.dtype == torch.bool else 2),
        ALIBI=call.alibi_slopes is not None, VARLEN=call.varlen, DROPOUT=o.dropout_p > 0,
        DOT_PRECISION=_dot_precision(q.dtype, q.device),
    ), max(window_left, 0), max(right, 0)


def on_tensors_device(launcher):
    """Run `launcher` with its first tensor's CUDA device current: Triton launches on the current
    device, not the tensors', and a model spread over GPUs (device_map="auto") calls layers on
    several. Switches only when they differ, so the usual call pays one comparison."""

    @functools.wraps(launcher)
    def launch(call, *args, **kwargs):
        device = call.q.device
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return launcher(call, *args, **kwargs)
        return launcher(call, *args, **kwargs)

    return launch


# ---------------------------------------------------------------------------------------------

@on_tensors_device
def forward(call: AttentionCall):
    q, k, v, attn_mask, alibi_slopes, sinks = call.q, call.k, call.v, call.attn_mask, call.alibi_slopes, call.sinks
    cu_seqlens_q, cu_seqlens_k, o = call.cu_seqlens_q, call.cu_seqlens_k, call.options
    scale, softcap, dropout_p = o.scale, o.softcap, o.dropout_p
    batch, lq, lk = call.batch, call.seqlen_q, call.seqlen_k
    if q.shape[0] == 0 or lq == 0 or (cu_seqlens_q is None and lk == 0):
        return empty_result(q, v, sinks)
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    out = new_output(q.shape[:-1] + (v.shape[-1],), q.dtype, q.device)
    lse_shape = (heads_q, q.shape[0]) if cu_seqlens_q is not None else (batch, heads_q, lq)
    lse = new_output(lse_shape, torch.float32, q.device)
    meta, left, right = _common_meta(call)
    blocks = forward_blocks(max(q.shape[-1], v.shape[-1]), q.dtype, o.causal, q.device.type, lq)
    mask, mask_strides, _ = _mask_args(attn_mask, q, batch, lq, lk)
    slopes, slope_strides = _alibi_args(alibi_slopes, q)
    seed, threshold, keep_scale = _dropout_args(dropout_p, call.dropout_seed)
    cu_q = q if cu_seqlens_q is None else cu_seqlens_q
    cu_k = q if cu_seqlens_k is None else cu_seqlens_k
    grid = (cdiv(lq, blocks.block_m), batch * heads_q)
    fwd, _ = _kernels(q.device)
    fwd.attention_forward_kernel[grid](
        q, k, v, out, lse, mask, slopes, q if sinks is None else sinks, cu_q, cu_k,
        *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(out), *_lse_strides(lse), *mask_strides,
        *slope_strides, lq, lk, heads_q, heads_q // heads_kv, scale, softcap, left, right, seed, threshold,
        keep_scale, SINKS_ON=sinks is not None, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, **meta)
    return out, lse


def _delta(grad_out, out, grad_lse):
    """delta = rowsum(dO * O) - dLSE, float32, contiguous in the LSE's layout."""
    delta = (grad_out.float() * out.float()).sum(-1)  # (B, Lq, Hq) or (T, Hq)
    delta = delta.transpose(-1, -2).contiguous()
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    return delta


def _sink_grad(sinks, lse, delta):
    """dsink_h = -sum_i exp(sink_h - lse_i) * delta_i (the sink's share of each row's softmax)."""
    if sinks is None:
        return None
    head_dim_first = lse if lse.dim() == 2 else lse.transpose(0, 1)  # (Hq, ...rows)
    weights = torch.exp(sinks.float().reshape(-1, *([1] * (head_dim_first.dim() - 1))) - head_dim_first)
    rows = delta if delta.dim() == 2 else delta.transpose(0, 1)
    return -(weights * rows).reshape(weights.shape[0], -1).sum(-1)


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a (B, Hq, Lq, Lk) gradient over the dimensions the mask broadcast along."""
    padded = (1,) * (4 - len(shape)) + tuple(shape)
    dims = [d for d, size in enumerate(padded) if size == 1 and grad.shape[d] != 1]
    if not dims:  # sum(dim=[]) would reduce every dimension
        return grad.reshape(shape)
    return grad.sum(dim=dims, keepdim=True).reshape(shape)


@on_tensors_device
def backward(call: AttentionCall, grads: Gradients):
    q, k, v, attn_mask, alibi_slopes, sinks = call.q, call.k, call.v, call.attn_mask, call.alibi_slopes, call.sinks
    cu_seqlens_q, cu_seqlens_k, o = call.cu_seqlens_q, call.cu_seqlens_k, call.options
    grad_out, grad_lse, out, lse = grads.grad_out, grads.grad_lse, grads.out, grads.lse
    scale, softcap = o.scale, o.softcap
    batch, lq, lk = call.batch, call.seqlen_q, call.seqlen_k
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    write_ds = bool(grads.want_mask_grad and attn_mask is not None)
    if q.shape[0] == 0 or k.shape[0] == 0 or lq == 0 or lk == 0:
        return empty_grads(q, k, v, sinks, grad_lse, attn_mask.shape if write_ds else None)
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    delta = _delta(grad_out, out, grad_lse)
    meta, left, right = _common_meta(call)
    mask, mask_strides, _ = _mask_args(attn_mask, q, batch, lq, lk)
    slopes, slope_strides = _alibi_args(alibi_slopes, q)
    seed, threshold, keep_scale = _dropout_args(o.dropout_p, call.dropout_seed)
    cu_q = q if cu_seqlens_q is None else cu_seqlens_q
    cu_k = q if cu_seqlens_k is None else cu_seqlens_k
    delta_strides = (0, delta.stride(0)) if delta.dim() == 2 else (delta.stride(0), delta.stride(1))
    shared = (*_strides4(q), *_strides4(k), *_strides4(v), *_strides4(grad_out), *_lse_strides(lse),
              *delta_strides, *mask_strides, *slope_strides)
    scalars = (scale, softcap, left, right, seed, threshold, keep_scale)
    dim = max(q.shape[-1], v.shape[-1])

    kv = backward_kv_blocks(dim, q.dtype, o.causal, q.device.type)
    _, bwd = _kernels(q.device)
    bwd.attention_backward_kv_kernel[(cdiv(lk, kv.block_n), batch * heads_kv)](
        q, k, v, grad_out, lse, delta, dk, dv, mask, slopes, cu_q, cu_k, *shared,
        *_strides4(dk)[:3], *_strides4(dv)[:3], lq, lk, heads_q, heads_kv, heads_q // heads_kv, *scalars,
        BLOCK_M=kv.block_m, BLOCK_N=kv.block_n, num_warps=kv.num_warps, num_stages=kv.num_stages, **meta)

    ds = torch.zeros((batch, heads_q, lq, lk), dtype=torch.float32, device=q.device) if write_ds else q
    qb = backward_q_blocks(dim, q.dtype, o.causal, q.device.type)
    bwd.attention_backward_q_kernel[(cdiv(lq, qb.block_m), batch * heads_q)](
        q, k, v, grad_out, lse, delta, dq, ds, mask, slopes, cu_q, cu_k, *shared, *_strides4(dq)[:3],
        lq, lk, heads_q, heads_q // heads_kv, *scalars, WRITE_DS=write_ds, BLOCK_M=qb.block_m,
        BLOCK_N=qb.block_n, num_warps=qb.num_warps, num_stages=qb.num_stages, **meta)

    dmask = _reduce_to(ds, attn_mask.shape) if write_ds else None
    return dq, dk, dv, _sink_grad(sinks, lse, delta), dmask




# ---------------------------------------------------------------------------------------------
# Decode over a (possibly quantized) KV cache (decode.py): split-K + merge.

# Split-K choice (kernels/launch.py's SplitPolicy), from the shape only (batch x KV heads x query tiles,
# visible key span): at most PROGRAMS_PER_SM x SMs programs.
PROGRAMS_PER_SM = 8
# GPU launch config of the split kernel; the benchmark may override (decode_config).
DECODE_CONFIG = dict(block_n=64, num_warps=4, num_stages=3)
# Quantized caches: H100 64k sweep (2026-11-21), packed conversions: 128 keys, 4 warps, 3 stages best for
# every format (64 keys 7-27% slower, 8 warps 37-48% slower).
DECODE_CONFIG_QUANT = dict(block_n=128, num_warps=4, num_stages=3)
_levels_cache: dict = {}
_asm_cache: dict = {}


def _asm_ok(device) -> bool:
    """Packed inline-PTX code conversions (decode.py): CUDA, compute capability >= 8.9 (fp8 cvt)."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _asm_cache:
        _asm_cache[index] = torch.cuda.get_device_capability(index) >= (8, 9)
    return _asm_cache[index]


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


@on_tensors_device
def decode(call: DecodeCall, config=None):
    """The triton decode (kernels/contract.py DecodeCall); config overrides DECODE_CONFIG (benchmarks)."""
    q, keys, values, o = call.q, call.keys, call.values, call.options
    k_codes, k_scales, k_format, k_group_size = keys.codes, keys.scales, keys.format, keys.group_size
    v_codes, v_scales, v_format, v_group_size = values.codes, values.scales, values.format, values.group_size
    alibi_slopes, sinks, cache_batch_idx, seqlens_k = call.alibi_slopes, call.sinks, call.cache_batch_idx, call.seqlens_k
    scale, softcap, window_left, right = o.scale, o.softcap, o.window_left, o.window_right
    batch, lq, heads_q, dim = q.shape
    heads_kv = k_codes.shape[2]
    group = heads_q // heads_kv
    k_spec, v_spec = kv_formats.spec(k_format), kv_formats.spec(v_format)
    dim_v = v_spec.logical_dim(v_codes.shape[-1])
    out = new_output((batch, lq, heads_q, dim_v), q.dtype, q.device)
    lse = new_output((batch, heads_q, lq), torch.float32, q.device)
    if batch == 0 or lq == 0:
        return out, lse
    quant = k_format != "none" or v_format != "none"
    cfg = dict(DECODE_CONFIG_QUANT if quant else DECODE_CONFIG, **(config or {}))
    on_gpu = q.device.type == "cuda"
    block_n = cfg["block_n"] if on_gpu else 16
    max_rows = 64 if on_gpu else 16
    block_q = min(_pow2(lq), 1 << (max(1, max_rows // group).bit_length() - 1))  # power of two <= rows / G
    block_m = max(16, _pow2(group * block_q))
    # Packed PTX conversions (decode.py). Not for nf4 under float32 q: its levels would be float16-rounded
    # (the integer and fp8 conversions are exact).
    asm = _asm_ok(q.device) and bool(cfg.get("asm", True)) and not (
        q.dtype == torch.float32 and (k_spec.codebook or v_spec.codebook))
    q_tiles = cdiv(lq, block_q)
    span = k_codes.shape[1]
    if window_left >= 0 and right >= 0:
        span = min(span, window_left + right + block_q)
    splits = split_policy(q.device).splits(batch * heads_kv * q_tiles, span, block_n, call.num_splits)
    direct = splits == 1
    ks, ks_strides, k_mode, k_gs, k_ng = _scale_args(k_scales, k_codes, k_format, k_group_size)
    vs, vs_strides, v_mode, v_gs, v_ng = _scale_args(v_scales, v_codes, v_format, v_group_size)
    if direct:
        part_o = part_lse = lse
    else:
        part_o = torch.empty(batch * heads_q * lq * splits * dim_v, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch * heads_q * lq * splits, dtype=torch.float32, device=q.device)
    slopes, slope_strides = _alibi_args(alibi_slopes, q)
    rows = q if cache_batch_idx is None else cache_batch_idx
    head_d, head_dv = k_spec.storage_dim(dim), v_spec.storage_dim(dim_v)
    e4m3 = 1.0 if asm else 256.0  # decode.py's integer e4m3 decode yields value / 256
    dot_precision = _dot_precision(q.dtype, q.device)
    _compiled_decode.decode_split_kernel[(splits, batch * heads_kv, q_tiles)](
        q, k_codes, v_codes, ks, vs, seqlens_k, rows, slopes, q if sinks is None else sinks,
        _levels(q.device, torch.float32 if dot_precision == "upcast" or q.dtype == torch.float32 else torch.float16),
        out, lse, part_o, part_lse, *q.stride(), *k_codes.stride(), *v_codes.stride(), *ks_strides, *vs_strides,
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), *slope_strides,
        lq, heads_kv, group, splits, max(window_left, 0), max(right, 0), scale, softcap,
        max(1, k_codes.shape[0]), k_codes.shape[1], HEAD_D=head_d, HEAD_DV=head_dv, BLOCK_D=padded_dim(head_d), BLOCK_DV=padded_dim(head_dv),
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, K_FMT=k_spec.kernel_id,
        V_FMT=v_spec.kernel_id, K_SCALE=k_mode, V_SCALE=v_mode,
        K_CONST=e4m3 if k_format == "fp8_e4m3" else 1.0, V_CONST=e4m3 if v_format == "fp8_e4m3" else 1.0,
        K_GS=k_gs, V_GS=v_gs, K_NG=k_ng, V_NG=v_ng,
        HAS_BATCH_IDX=cache_batch_idx is not None, HAS_LEFT=window_left >= 0, HAS_RIGHT=right >= 0,
        SOFTCAP=softcap > 0, ALIBI=alibi_slopes is not None, SINKS_ON=sinks is not None, DIRECT=direct,
        DOT_PRECISION=dot_precision, ASM=asm, num_warps=cfg["num_warps"] if on_gpu else 1,
        num_stages=cfg["num_stages"] if on_gpu else 1)
    if not direct:
        _compiled_decode.decode_merge_kernel[(batch * heads_q * lq,)](
            part_o, part_lse, q if sinks is None else sinks, out, lse, out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1), lq, heads_q, splits, HEAD_DV=dim_v, BLOCK_DV=padded_dim(dim_v),
            BLOCK_P=max(16, _pow2(splits)), SINKS_ON=sinks is not None, num_warps=4 if on_gpu else 1)
    return out, lse


BACKEND = BackendDefinition(NAME, supports, forward, backward, decode, device_types=None)
