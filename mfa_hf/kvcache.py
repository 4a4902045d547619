"""flash_attn_with_kvcache (FlashAttention-2's semantics) over plain or quantized caches.

    k_cache = mfa_hf.allocate_kv_cache(batch, max_seqlen, heads_kv, head_dim, "int8", dtype=torch.bfloat16)
    out = mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=lengths)
    lengths += k_new.shape[1]   # the caller owns the lengths, as in FlashAttention-2

Appending is its own custom op (mfa_hf::kvcache_append, mutates the cache tensors); attention is
the backend's pure decode op (mfa_hf/ops.py, on a kernels/contract.py DecodeCall). Every check runs before anything is
written, so a bad call leaves the cache untouched.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import dispatch, helper_tensors, kv_formats, ops, scalars
from .decisions import Decisions, steering_environment
from .kernels.contract import AppendCall, CacheSide, DecodeCall, Options, fold_causal
from .kernels.launch import lse_dtype, shape_and_strides
from .ops import describe_decode, plain_eager
from .problem import (FLOAT_DTYPES, NO_WINDOW, check_alibi, check_dense, check_dropout, check_scale, check_sinks,
                      check_softcap, check_window, fits_dim, values_checked)
from .quant import (SCALE_DTYPE, QuantizedKV, absmax_scales, check_scale_values, check_static_scale_values, encode,
                    parse_format, scales_per_token)

INDEX_DTYPES = (torch.int32, torch.int64)


def _write(cache: Tensor, new: Tensor, cache_seqlens: Tensor, cache_batch_idx: Optional[Tensor]) -> None:
    """cache[row_b, cache_seqlens[b] + t] = new[b, t] for every t (rows: cache_batch_idx or b).

    Off the CPU the indices are clamped into the cache: values there are not read back (problem.values_checked),
    and an out-of-range index would write past the cache on mps (no bounds check) or kill the CUDA context
    (a device-side assert); a bad value then overwrites a slot of the cache, never memory beyond it."""
    _put(cache, new, *_cache_indices(cache, cache_seqlens, cache_batch_idx, new.shape[1]))


def _cache_indices(cache: Tensor, cache_seqlens: Tensor, cache_batch_idx: Optional[Tensor], count: int):
    # CPU: validated, and indexing raises
    return _append_indices(cache, cache_seqlens, cache_batch_idx, count, bounded=cache.device.type != "cpu")


def _put(cache: Tensor, new: Tensor, rows: Tensor, positions: Tensor) -> None:
    cache[rows[:, None], positions] = new.to(cache.dtype)


# The op compiled and traced code sees (it mutates `cache`); plain eager calls write directly (_append_each), as
# the attention ops do (ops.plain_eager): the four writes of a layer's decode step each paid the dispatcher.
_append = torch.library.custom_op("mfa_hf::kvcache_append", _write, mutates_args=("cache",))


def _append_each(writes: list[tuple[Tensor, Tensor]], cache_seqlens: Tensor, cache_batch_idx: Optional[Tensor],
                 position: Optional[int] = None) -> None:
    """Every (cache, new) write of one append. Plain eager calls share the indices between the writes (one
    cache's codes and scales, K and V: the same rows and positions whenever the caches' first two dims agree);
    with `position` (every row's length, a host int already checked against the capacity) they write slices,
    no index tensors."""
    flat = [t for pair in writes for t in pair]
    if not plain_eager((*flat, cache_seqlens, cache_batch_idx)):
        for cache, new in writes:
            _append(cache, new, cache_seqlens, cache_batch_idx)
        return
    if position is not None and cache_batch_idx is None:
        for cache, new in writes:
            cache[:, position:position + new.shape[1]] = new
        return
    indices = {}
    for cache, new in writes:
        key = (cache.shape[0], cache.shape[1], new.shape[1])
        if key not in indices:
            indices[key] = _cache_indices(cache, cache_seqlens, cache_batch_idx, new.shape[1])
        _put(cache, new, *indices[key])


def _append_indices(cache: Tensor, cache_seqlens: Tensor, cache_batch_idx: Optional[Tensor], count: int,
                    bounded: bool) -> tuple[Tensor, Tensor]:
    """(rows (B,), positions (B, count)) that _append writes; bounded: clamped into the cache."""
    batch = cache_seqlens.shape[0]
    rows = torch.arange(batch, device=cache.device) if cache_batch_idx is None else cache_batch_idx.long()
    positions = cache_seqlens.long()[:, None] + torch.arange(count, device=cache.device)
    if bounded and cache.shape[0] and cache.shape[1]:
        positions = positions.clamp(0, cache.shape[1] - 1)
        if cache_batch_idx is not None:
            rows = rows.clamp(0, cache.shape[0] - 1)
    return rows, positions


@_append.register_fake
def _(cache, new, cache_seqlens, cache_batch_idx):
    return None



def check_head_dim_fits_groups(format, group_size: int | None, head_dim: int) -> None:
    """A grouped format (nf4) keeps a scale per group of group_size (None: its default) along D: D must be a
    multiple of it."""
    spec = kv_formats.spec(parse_format(format))
    group_size = group_size or spec.default_group_size
    if spec.grouped and head_dim % group_size:
        raise ValueError(f"head_dim: expected a multiple of the {spec.name} group size {group_size} "
                         f"({spec.group_sizes_text()}), got {head_dim}")

def allocate_kv_cache(batch: int, max_seqlen: int, heads_kv: int, head_dim: int, format: str | None = None, *,
                      dtype: torch.dtype = torch.float32, device=None, group_size: int | None = None,
                      static_scales: Tensor | None = None):
    """An empty (batch, max_seqlen, heads_kv, head_dim) cache: a tensor (format None) or a QuantizedKV.

    Quantized caches hold a float32 scale per (token, head) (nf4: per group along D) unless
    static_scales (per head (1 or B, 1, H, 1) or per channel (1 or B, 1, H, D)) are given.
    """
    batch, max_seqlen = scalars.int_at_least(batch, "batch", 0), scalars.int_at_least(max_seqlen, "max_seqlen", 0)
    heads_kv, head_dim = scalars.int_at_least(heads_kv, "heads_kv", 1), scalars.int_at_least(head_dim, "head_dim", 1)
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected a float torch.dtype (the cache's logical dtype: float16, bfloat16, float32 "
                        f"or float64), got {dtype!r}")
    device = _device(device)
    if format is None or format == "none":
        if group_size is not None or static_scales is not None:
            raise ValueError("group_size, static_scales: expected None for an unquantized cache (format None), got "
                             f"group_size={group_size!r} and static_scales={_describe(static_scales)}")
        return torch.zeros(batch, max_seqlen, heads_kv, head_dim, dtype=dtype, device=device)
    fmt = parse_format(format)
    spec = kv_formats.spec(fmt)
    if spec.grouped:
        sizes = spec.group_sizes_text()
        group_size = spec.default_group_size if group_size is None else scalars.int_like(
            group_size, "group_size", f"{sizes} for {fmt.value}")
        if group_size not in spec.group_sizes:
            raise ValueError(f"group_size: expected {sizes} for {fmt.value}, got {group_size!r}")
        check_head_dim_fits_groups(fmt, group_size, head_dim)
    elif group_size is not None:
        grouped = ", ".join(f.name for f in kv_formats.QUANTIZED if f.grouped)
        raise ValueError(f"group_size: expected None for {fmt.value} (only {grouped} has groups), got {group_size!r}")
    codes = torch.zeros(batch, max_seqlen, heads_kv, spec.storage_dim(head_dim), dtype=spec.code_dtype, device=device)
    if static_scales is not None:
        if spec.grouped:
            raise ValueError(f"static_scales: {fmt.value} keeps a scale per group of each token, got static scales")
        if not isinstance(static_scales, torch.Tensor) or static_scales.dim() != 4:
            raise TypeError(f"static_scales: expected a 4-D float32 tensor, per head (1 or B, 1, H, 1) or per "
                            f"channel (1 or B, 1, H, D), got {_describe(static_scales)}")
        if static_scales.shape[1] != 1 or static_scales.shape[2] != heads_kv or not fits_dim(static_scales.shape[-1], head_dim) \
                or not fits_dim(static_scales.shape[0], batch):
            raise ValueError(f"static_scales: expected shape (1 or {batch}, 1, {heads_kv}, 1 or {head_dim}), got "
                             f"{tuple(static_scales.shape)}")
        if static_scales.dtype != SCALE_DTYPE:
            raise TypeError(f"static_scales: expected dtype {SCALE_DTYPE}, got {static_scales.dtype}")
        if static_scales.device != codes.device:
            raise ValueError(f"static_scales: expected device {codes.device} like the cache, got {static_scales.device}")
        check_scale_values(static_scales, "static_scales")
        if max_seqlen == 1 and static_scales.shape[0] == batch:
            raise ValueError(f"static_scales: a cache of one position (max_seqlen 1) reads scales of its batch "
                             f"({batch}) as per-token scales, which an append rewrites; got static scales of shape "
                             f"{tuple(static_scales.shape)}: pass max_seqlen >= 2"
                             + (" or static scales of batch 1" if batch > 1 else ""))
        size = head_dim // static_scales.shape[-1]  # checked above: 4-D, last dim 1 or head_dim
        return QuantizedKV(codes, static_scales, fmt, size, dtype)
    group_size = group_size if spec.grouped else head_dim
    scales = torch.ones(batch, max_seqlen, heads_kv, head_dim // group_size, dtype=SCALE_DTYPE, device=device)
    return QuantizedKV(codes, scales, fmt, group_size, dtype)


def _device(device):
    """allocate_kv_cache's device as torch takes it, or a ValueError naming the argument."""
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: expected a torch.device, a device string ('cpu', 'mps', 'cuda:0') or an index, got "
                         f"{device!r} ({error})") from None


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache,
    v_cache,
    k: Tensor | None = None,
    v: Tensor | None = None,
    cache_seqlens: Tensor | int | None = None,
    cache_batch_idx: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = NO_WINDOW,
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    return_lse: bool = False,
    num_splits: int = 0,
):
    """Attention of q (B, Lq, Hq, D) over a KV cache, appending new k/v in place first.

    k_cache/v_cache: (B_cache, S_max, Hkv, D) tensors, or QuantizedKV of that logical shape (new
    k/v are quantized on the way in). cache_seqlens (B,) int32: valid keys per sequence BEFORE the
    append (None: the whole cache; an int: the same for every row). k/v (B, Lnew, Hkv, D) are
    written at positions cache_seqlens[b] .. + Lnew - 1; attention then covers cache_seqlens + Lnew
    keys. cache_batch_idx (B,) maps batch rows to cache rows. Causal/window align bottom-right:
    query i sees keys j <= L_b - Lq + i (L_b the length after the append). Any Lq (decode is 1).
    num_splits 0 lets the backend choose the split-K factor from the shape. The caller updates
    cache_seqlens afterwards. Tensor cache_seqlens/cache_batch_idx values are checked on CPU; on mps/cuda
    they are trusted as in FlashAttention-2 (nothing is read back from the device; MFA_CHECK_VALUES=1 checks
    them at the price of a sync): out-of-range values give undefined results, bounded by the cache. Returns (B, Lq, Hq, Dv) (and lse (B, Hq, Lq) with return_lse).
    """
    check_query(q)
    return_lse = scalars.flag(return_lse, "return_lse")
    quantized = _check_caches(q, k_cache, v_cache)
    batch = q.shape[0]
    cache_batch, max_seqlen = k_cache.shape[0], k_cache.shape[1]
    rows = _check_batch_idx(cache_batch_idx, batch, cache_batch, q.device, appending=k is not None)
    new_len = _check_new(k, v, q, k_cache, v_cache, quantized)
    _check_writable(k_cache, v_cache, new_len, k, v)
    lengths = _check_seqlens(cache_seqlens, batch, max_seqlen, new_len, q.device)
    # The append and decode kernels bind these as they are (helper_tensors.py says why).
    lengths = helper_tensors.index_vector(lengths, "cache_seqlens", max_seqlen)
    rows = helper_tensors.index_vector(rows, "cache_batch_idx", cache_batch)
    options = _check_options(q, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks, num_splits)
    total = lengths + new_len if new_len else lengths
    call = _decode_call(q, k_cache, v_cache, total, rows, alibi_slopes, sinks, *options)
    problem = describe_decode(call)
    chosen = dispatch.select(problem)
    if k is not None and new_len:  # every check above ran first: a rejected call writes nothing
        _append_all(k_cache, v_cache, k, v, lengths, rows, chosen.ops.append, _host_position(cache_seqlens))
    found = _decode(call, problem, return_lse, chosen)
    if k is not None and torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
        # The append copies the new tokens into the cache: no graph reaches them. As for q, the forward stays served
        # (inference code often runs with grad on) and a backward that would need their gradients is refused.
        found = ops.refusing_backward(found, k, v)
    return found


def append_kv(k_cache, v_cache, k: Tensor, v: Tensor, cache_seqlens) -> None:
    """Write k/v (B, Lnew, Hkv, D) into the caches at positions cache_seqlens .. + Lnew - 1 (an int for
    every row, or a (B,) int32 tensor): flash_attn_with_kvcache's append without the attention. It goes
    through the backend that serves these caches: its own append kernel (the metal backend quantizes on
    write in one kernel), else the generic encode-and-write. Every check runs before anything is written."""
    quantized = _check_caches(k, k_cache, v_cache, names=("k_cache", "v_cache"))
    _check_batch_idx(None, k.shape[0], k_cache.shape[0], k.device, appending=True)
    new_len = _check_new(k, v, k, k_cache, v_cache, quantized)
    _check_writable(k_cache, v_cache, new_len, k, v)
    lengths = _check_seqlens(cache_seqlens, k.shape[0], k_cache.shape[1], new_len, k.device)
    lengths = helper_tensors.index_vector(lengths, "cache_seqlens", k_cache.shape[1])
    if not new_len:
        return
    _append_all(k_cache, v_cache, k, v, lengths, None, _append_kernel(k, k_cache, v_cache, lengths),
                _host_position(cache_seqlens))


def _host_position(cache_seqlens) -> Optional[int]:
    """Every row's length when the caller gave it as a host int (checked against the capacity by then)."""
    return None if cache_seqlens is None or isinstance(cache_seqlens, Tensor) else int(cache_seqlens)


# A kind of append (what selects the backend: dtypes, shapes, formats, device, steering environment) -> the backend's
# append kernel or None (the generic write): selection costs more than a decode step's encode and write.
_append_kernels = Decisions()


def _append_kernel(k: Tensor, k_cache, v_cache, lengths: Tensor) -> Optional[Callable]:
    kind = (k.dtype, k.device, k.shape, k.stride(), _layout(k_cache), _layout(v_cache), steering_environment())
    if kind in _append_kernels:
        return _append_kernels[kind]
    call = _decode_call(k, k_cache, v_cache, lengths, None, None, None, Options(1.0), 0)
    return _append_kernels.keep(kind, dispatch.select(describe_decode(call)).ops.append)


def _layout(cache) -> tuple:
    """What a backend's support can depend on in a cache: format, shapes and strides (index spans)."""
    if isinstance(cache, QuantizedKV):
        return (cache.format, cache.group_size, shape_and_strides(cache.codes), shape_and_strides(cache.scales))
    return (cache.dtype, shape_and_strides(cache))


def attention_over_quantized(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks,
                             return_lse, dropout_p=0.0, attn_mask=None):
    """flash_attn_func with QuantizedKV k and v (prefill or any Lq): every row sees all S keys."""
    if attn_mask is not None:
        raise ValueError("attn_mask: not supported with quantized k/v (use causal/window_size), got a mask")
    if check_dropout(dropout_p) != 0.0:
        raise ValueError(f"dropout_p: expected 0 with quantized k/v (inference only), got {dropout_p!r}")
    check_query(q)
    _check_caches(q, k, v, names=("k", "v"))
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k: expected batch {q.shape[0]} like q, got {k.shape[0]}")
    if torch.is_grad_enabled() and q.requires_grad:
        raise ValueError("q: quantized k/v serve inference only; got q requiring grad (use torch.no_grad())")
    lengths = _same_lengths(q.shape[0], k.shape[1], q.device)
    options = _check_options(q, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks, 0)
    call = _decode_call(q, k, v, lengths, None, alibi_slopes, sinks, *options)
    problem = describe_decode(call)
    return _decode(call, problem, return_lse, dispatch.select(problem))


def _check_options(q, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks, num_splits) -> tuple:
    """(Options with causal folded into the window, num_splits), validated."""
    window_left, window_right = fold_causal(scalars.flag(causal, "causal"), check_window(window_size))
    scale = check_scale(softmax_scale, q.shape[-1])
    softcap = check_softcap(softcap)
    check_sinks(sinks, q.shape[2], q.device)
    check_alibi(alibi_slopes, q.shape[0], q.shape[2], q.device)
    expected = "an int >= 0 (0 = choose from the shape)"
    splits = scalars.int_like(num_splits, "num_splits", expected, ValueError)  # as num_splits always raised
    if splits < 0:
        raise ValueError(f"num_splits: expected {expected}, got {num_splits!r}")
    return Options(scale, window_left, window_right, softcap), splits


def _decode_call(q, k_cache, v_cache, lengths, rows, alibi_slopes, sinks, options, num_splits) -> DecodeCall:
    return DecodeCall(q, cache_side(k_cache), cache_side(v_cache), lengths, options, rows,
                      helper_tensors.per_head_floats(alibi_slopes, q.dtype),
                      helper_tensors.per_head_floats(sinks, q.dtype), num_splits)


def _decode(call: DecodeCall, problem, return_lse: bool, backend):
    q = call.q
    if q.shape[0] == 0:  # no rows: nothing to launch (kernels size their grids and splits from the batch)
        out = q.new_empty((0, q.shape[1], q.shape[2], problem.head_dim_v))
        lse = q.new_empty((0, q.shape[2], q.shape[1]), dtype=lse_dtype(q.dtype))
        return (out, lse) if return_lse else out
    if call.q.is_meta:  # no values to read: the registered op's shape function gives the output
        out, lse = backend.ops.decode.op(*call.op_args())
    else:
        out, lse = backend.ops.decode(call, problem)
    return (out, lse) if return_lse else out


def cache_side(cache) -> CacheSide:
    """A plain cache tensor or a QuantizedKV as the kernels read it."""
    if isinstance(cache, QuantizedKV):
        return CacheSide(cache.codes, cache.scales, cache.format.value, cache.group_size)
    return CacheSide(cache, None, "none", cache.shape[-1])


# ----------------------------------------------------------------------------------------------
# Appending: quantize the new tokens with the cache's format (and static scales), then write.


def _append_all(k_cache, v_cache, k, v, lengths, rows, backend_append=None, position: Optional[int] = None):
    """Encode both sides first, write after: a failure while encoding leaves the cache untouched.

    A backend with its own append kernel (metal: quantize on write in-kernel) gets the raw new
    tokens instead; everything it could reject was validated before this point. position: every
    row's length as a host int (checked), when the caller had one.
    """
    if k.shape[0] == 0:  # no rows: nothing to write (nf4's packing cannot reshape an empty batch)
        return
    if backend_append is not None:
        for cache, new in ((k_cache, k), (v_cache, v)):
            side = cache_side(cache)
            if side.scales is None:
                side = CacheSide(side.codes, new.new_empty((0,), dtype=torch.float32), side.format, side.group_size)
            backend_append(AppendCall(side, new, lengths, rows))
        return
    _append_each(_writes_of_both(k_cache, v_cache, k, v, rows), lengths, rows, position)


def append_generic(cache, new: Tensor, lengths: Tensor, rows: Optional[Tensor]) -> None:
    """One side's append without a backend kernel (encode, then write): what a backend whose append
    kernel cannot be built here hands its call to (mfa_hf/kernel_fallback.py)."""
    _append_each(_writes(cache, new, rows), lengths, rows)


def _writes(cache, new, rows) -> list[tuple[Tensor, Tensor]]:
    if not isinstance(cache, QuantizedKV):
        return [(cache, new)]
    if _per_token_scales(cache):
        scales = absmax_scales(new, cache.format, "token", cache.group_size)
        return [(cache.codes, encode(new, scales, cache.format, cache.group_size)), (cache.scales, scales)]
    static = cache.scales
    if rows is not None and static.shape[0] > 1:
        static = static.index_select(0, rows.long())
    elif static.shape[0] > 1 and static.shape[0] != new.shape[0]:
        raise ValueError(f"scales: expected batch {new.shape[0]} or 1, got {static.shape[0]}")
    return [(cache.codes, encode(new, static, cache.format, cache.group_size))]


def _writes_of_both(k_cache, v_cache, k: Tensor, v: Tensor, rows) -> list[tuple[Tensor, Tensor]]:
    """_writes of K and V. Two quantized sides of one shape and format with per-token scales are encoded as one
    tensor: the same values (each token's scale is its own), half the small ops of a decode step's append."""
    if not (isinstance(k_cache, QuantizedKV) and isinstance(v_cache, QuantizedKV) and k.shape == v.shape
            and k_cache.format == v_cache.format and k_cache.group_size == v_cache.group_size
            and _per_token_scales(k_cache) and _per_token_scales(v_cache)):
        return _writes(k_cache, k, rows) + _writes(v_cache, v, rows)
    both = torch.cat([k, v])  # (2B, n, H, D): K's rows, then V's
    scales = absmax_scales(both, k_cache.format, "token", k_cache.group_size)
    codes = encode(both, scales, k_cache.format, k_cache.group_size)
    batch = k.shape[0]
    return [(k_cache.codes, codes[:batch]), (k_cache.scales, scales[:batch]),
            (v_cache.codes, codes[batch:]), (v_cache.scales, scales[batch:])]


def _per_token_scales(cache: QuantizedKV) -> bool:
    return scales_per_token(cache.codes, cache.scales)


# ----------------------------------------------------------------------------------------------
# Validation (errors name the argument, what was expected and what came).


def check_query(q) -> None:
    check_dense(q, "q")
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or not q.is_floating_point():
        raise ValueError(f"q: expected a 4-D float tensor (B, Lq, Hq, D), got {_describe(q)}")
    if q.dtype not in FLOAT_DTYPES:  # float8 q: the kernels compute in q's dtype (a float8 output, as no other API)
        raise TypeError(f"q: expected float16, bfloat16, float32 or float64, got {q.dtype}")
    if q.shape[-1] < 1:
        raise ValueError(f"q: expected a head dim >= 1, got shape {tuple(q.shape)}")


def check_decode_call(call: DecodeCall, host_rows=None) -> None:
    """The checks flash_attn_with_kvcache runs, on a call a decode plan built (mfa_hf/decode_plan.py:
    once per kind of layer per step). host_rows: cache_batch_idx's values, known on the host."""
    q = call.q
    check_query(q)
    k_cache, v_cache = (_cache_of(side, q.dtype) for side in (call.keys, call.values))
    _check_caches(q, k_cache, v_cache)
    _check_batch_idx(call.cache_batch_idx, q.shape[0], k_cache.shape[0], q.device, appending=False,
                     host_values=None if host_rows is None else list(host_rows))
    o = call.options
    _check_options(q, o.scale, False, o.window, o.softcap, call.alibi_slopes, call.sinks, call.num_splits)
    if call.has_residual:
        _check_caches(q, call.residual_keys, call.residual_values, names=("residual_keys", "residual_values"))
        if call.residual_keys.shape[0] != k_cache.shape[0] or call.residual_keys.shape[2] != k_cache.shape[2]:
            raise ValueError(f"residual_keys: expected (B_cache, r, Hkv) rows and heads like k_cache "
                             f"{(k_cache.shape[0], k_cache.shape[2])}, got {tuple(call.residual_keys.shape)}")


def _cache_of(side: CacheSide, dtype):
    if side.format == "none":
        return side.codes
    return QuantizedKV(side.codes, side.scales, side.format, side.group_size, dtype)


def _check_caches(q, k_cache, v_cache, names=("k_cache", "v_cache")) -> bool:
    k_quantized, v_quantized = isinstance(k_cache, QuantizedKV), isinstance(v_cache, QuantizedKV)
    if k_quantized != v_quantized:
        raise TypeError(f"{names[0]}, {names[1]}: expected both QuantizedKV or both tensors, got "
                        f"{type(k_cache).__name__} and {type(v_cache).__name__}")
    for name, cache in zip(names, (k_cache, v_cache)):
        if not k_quantized:
            check_dense(cache, name)
            if not isinstance(cache, torch.Tensor) or cache.dim() != 4:
                raise ValueError(f"{name}: expected a 4-D tensor (B_cache, S_max, Hkv, D) or a QuantizedKV, "
                                 f"got {_describe(cache)}")
            if cache.device != q.device:
                raise ValueError(f"{name}: expected device {q.device} like q, got {cache.device}")
            if cache.dtype != q.dtype:
                raise TypeError(f"{name}: expected dtype {q.dtype} like q, got {cache.dtype}")
            if cache.shape[-1] < 1:
                raise ValueError(f"{name}: expected a head dim >= 1, got shape {tuple(cache.shape)}")
        elif cache.heads_first:
            raise ValueError(f"{name}: expected a (B, S, H, D) QuantizedKV, got a (B, H, S, D) view of one "
                             f"(transpose(1, 2) or layout='bhsd'; flash_attention takes those)")
        if cache.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} like q, got {cache.device}")
    kb, ks, kh, kd = k_cache.shape
    vb, vs, vh, _ = v_cache.shape
    if (vb, vs, vh) != (kb, ks, kh):
        raise ValueError(f"{names[1]}: expected (B, S, Hkv) = {(kb, ks, kh)} like {names[0]}, got {(vb, vs, vh)}")
    if kd != q.shape[-1]:
        raise ValueError(f"{names[0]}: expected head dim {q.shape[-1]} like q, got {kd}")
    if kh == 0 or q.shape[2] % kh:
        raise ValueError(f"{names[0]}: expected a number of KV heads dividing {q.shape[2]} query heads, got {kh}")
    return k_quantized


def _check_batch_idx(cache_batch_idx, batch, cache_batch, device, appending: bool,
                     host_values: list[int] | None = None) -> Tensor | None:
    if cache_batch_idx is None:
        if cache_batch != batch:
            raise ValueError(f"k_cache: expected batch {batch} like q (or pass cache_batch_idx), got {cache_batch}")
        return None
    _check_index_vector("cache_batch_idx", cache_batch_idx, batch, device)
    if host_values is None and not values_checked(cache_batch_idx):
        return cache_batch_idx  # trusted (FA2); kernels clamp the rows they index
    values = cache_batch_idx.tolist() if host_values is None else list(host_values)
    if len(values) != batch:
        raise ValueError(f"host_batch_idx: expected {batch} values like cache_batch_idx, got {len(values)}")
    if any(not 0 <= r < cache_batch for r in values):
        raise ValueError(f"cache_batch_idx: expected rows in [0, {cache_batch}), got {values}")
    if appending and len(set(values)) != len(values):
        raise ValueError(f"cache_batch_idx: expected distinct rows when appending k/v, got {values}")
    return cache_batch_idx


def _check_new(k, v, q, k_cache, v_cache, quantized) -> int:
    if (k is None) != (v is None):
        raise ValueError(f"k, v: expected both or neither, got k={_describe(k)} and v={_describe(v)}")
    if k is None:
        return 0
    for name, new, cache in (("k", k, k_cache), ("v", v, v_cache)):
        check_dense(new, name)
        if not isinstance(new, torch.Tensor) or new.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor (B, Lnew, Hkv, D), got {_describe(new)}")
        want = (q.shape[0], k.shape[1], cache.shape[2], cache.shape[3])
        if tuple(new.shape) != want:
            raise ValueError(f"{name}: expected shape (B, Lnew, Hkv, D) = {want}, got {tuple(new.shape)}")
        if new.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} like q, got {new.device}")
        if new.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} like q, got {new.dtype}")
    return k.shape[1]


def _check_writable(k_cache, v_cache, new_len: int, k=None, v=None) -> None:
    """Caches that get new tokens are written in place, so:
    - a cache must not share memory between its own elements: in an expanded (zero-stride) or otherwise
      overlapping view, a token written for one row lands in another row's keys too;
    - k_cache and v_cache must not be one tensor (or one view of it) unless k and v are too (then both writes
      put the same values there): the values' write would replace the keys';
    - with grad mode on, no written tensor may require grad: autograd cannot record our in-place write (torch
      refuses such writes into a leaf), so gradients through the cache would silently miss it."""
    if not new_len:
        return
    written = []
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        written.append([(name, cache)] if not isinstance(cache, QuantizedKV) else [(f"{name}.codes", cache.codes)])
        if isinstance(cache, QuantizedKV) and _per_token_scales(cache):
            written[-1].append((f"{name}.scales", cache.scales))
        elif isinstance(cache, QuantizedKV):  # static: the new tokens are encoded with them
            check_static_scale_values(cache.scales, f"{name}.scales")
        for label, t in written[-1]:
            if _may_overlap(t):
                raise ValueError(f"{label}: expected a cache whose elements do not share memory when k/v are "
                                 f"appended, got shape {tuple(t.shape)} with strides {t.stride()} (an expanded or "
                                 "overlapping view; pass a cache of its own, e.g. .clone())")
            if t.requires_grad and torch.is_grad_enabled():
                raise ValueError(f"{label}: expected a cache that does not require grad when k/v are appended with "
                                 "grad mode on (the append writes into it in place, which autograd cannot record), "
                                 "got requires_grad=True; append under torch.no_grad() or pass a detached cache")
    if k is not None and v is not None and _same_view(k, v):
        return  # one cache, one new tensor: the two writes are the same
    for (k_label, k_t), (v_label, v_t) in zip(written[0], written[1]):
        if _same_view(k_t, v_t):
            raise ValueError(f"{v_label}: expected memory apart from {k_label} when different k and v are appended "
                             f"(the values' write would replace the keys'), got the same tensor; pass a cache of its "
                             "own")


def _same_view(a: Tensor, b: Tensor) -> bool:
    """Whether a and b address exactly the same elements (one tensor, or equal views of it). Where data pointers
    mean nothing or cannot be read (torch.compile, meta tensors, tensor subclasses such as fake tensors), only the
    tensor's identity is checked."""
    if a is b:
        return a.numel() > 0
    if (torch.compiler.is_compiling() or type(a) is not Tensor or type(b) is not Tensor or a.device.type == "meta"
            or b.device.type == "meta"):
        return False
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.numel() > 0)


def _may_overlap(t: Tensor) -> bool:
    """Whether two indices of t may reach one element: its dims of size > 1, by increasing stride, must each step
    past everything the smaller ones span (False for every layout a cache allocates or slices)."""
    span = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride < span:
            return True
        span += stride * (size - 1)
    return False


def _check_seqlens(cache_seqlens, batch, max_seqlen, new_len, device) -> Tensor:
    if cache_seqlens is None:
        if new_len:
            raise ValueError("cache_seqlens: expected the valid lengths when appending k/v, got None")
        return _same_lengths(batch, max_seqlen, device)
    if not isinstance(cache_seqlens, torch.Tensor):
        # Known on the host: checked here, nothing read back from the device (decode loops pass ints).
        cache_seqlens = scalars.int_like(cache_seqlens, "cache_seqlens",
                                         "a (B,) int32 tensor, an int (every row) or None (the whole cache)")
        if not 0 <= cache_seqlens <= max_seqlen - new_len:
            raise ValueError(f"cache_seqlens: expected a length in [0, {max_seqlen - new_len}] (the cache capacity "
                             f"{max_seqlen} minus {new_len} new tokens), got {cache_seqlens}")
        return _same_lengths(batch, cache_seqlens, device)
    _check_index_vector("cache_seqlens", cache_seqlens, batch, device)
    if values_checked(cache_seqlens):  # else trusted (FA2): kernels bound keys by the cache's capacity
        values = cache_seqlens.tolist()
        if any(n < 0 for n in values):
            raise ValueError(f"cache_seqlens: expected lengths >= 0, got {values}")
        over = [n for n in values if n + new_len > max_seqlen]
        if over:
            raise ValueError(f"cache_seqlens: expected lengths + {new_len} new tokens <= the cache capacity "
                             f"{max_seqlen}, got {values}")
    return cache_seqlens


def _same_lengths(batch: int, length: int, device) -> Tensor:
    """Every row's length, from a host int. Decode steps of a model get theirs from the step's plan
    (mfa_hf/decode_plan.py), made once for all layers; a direct call makes its own."""
    return torch.full((batch,), length, dtype=torch.int32, device=device)


def _check_index_vector(name, t, batch, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor (B,) int32, got {type(t).__name__}")
    check_dense(t, name)
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected dtype torch.int32 (or int64), got {t.dtype}")
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} like q, got {t.device}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D {x.dtype} tensor of shape {tuple(x.shape)}"
    if isinstance(x, QuantizedKV):
        return f"QuantizedKV({x.format.value}, shape {tuple(x.shape)})"
    return "None" if x is None else type(x).__name__
