"""FlashAttention-2's public functions, with its signatures, served by mfa-hf kernels.

This is what `import flash_attn` (and `flash_attn.flash_attn_interface`) returns while the shim is
enabled. Meanings are FA2 2.8.3's (the same as 2.6.3's), which are ours (bottom-right causal, window_size=(-1, -1)
unbounded, softcap 0 = off). Where FA2 and mfa-hf differ in a convention, the shim converts to FA2's:

- window_size: any pair of int-likes (ints, numpy integers, 0-d or 1-element integer tensors, a
  2-element tensor); a negative side means unbounded, as in FA2.
- return_attn_probs=True returns FA2's (out, softmax_lse, S_dmask): softmax_lse float32 (B, H, Sq),
  or (H, total_q) for the varlen functions, +inf on a row that sees no key (FA2's kernels write +inf
  there, mfa-hf's own API -inf); S_dmask is None when dropout_p == 0 (FA2 returns no matrix then),
  and with dropout_p > 0 the dropout mask and unnormalized probabilities in FA2's encoding,
  recomputed to match our kernel's own dropout mask (attn_probs.py).
- block_table (paged KV) and cache_leftpad are served by gathering pages / one call per batch row
  (correct, not fast: see README.md); rotary_cos/rotary_sin rotate q and the new k before the
  append, as FA2 documents.
"""

from __future__ import annotations

import math
import operator

import torch

from mfa_hf import api, kvcache
from mfa_hf.kernels.dropout import new_seed
from mfa_hf.problem import InputError, check_scale, shape_is, values_checked

from . import attn_probs
from .rotary import check_cos_sin, rotate_at

NO_WINDOW = (-1, -1)
# FA2 >= 2.7 says here whether its ROCm Triton backend serves; FA2's own tests import it. Never ours.
USE_TRITON_ROCM = False


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-D {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)


def _window(window_size) -> tuple[int, int]:
    """FA2's window_size as a pair of Python ints, -1 for an unbounded side."""
    try:
        sides = list(window_size)
    except TypeError:
        sides = None
    if sides is None or len(sides) != 2:
        raise ValueError(f"window_size: expected a pair (left, right) of ints (-1 = unbounded), got {window_size!r}")
    pair = []
    for name, value in zip(("left", "right"), sides):
        if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
            number = None
        else:
            try:
                number = operator.index(value)
            except TypeError:
                number = None
        if number is None:
            raise ValueError(f"window_size: expected {name} to be an int or an int-like (numpy integer, 0-d or "
                             f"1-element integer tensor), got {value!r}")
        pair.append(-1 if number < 0 else number)
    return pair[0], pair[1]


def _fa2_lse(lse: torch.Tensor) -> torch.Tensor:
    """FA2 reports +inf as the LSE of a row with no visible key; mfa-hf's kernels report -inf."""
    return lse.masked_fill(lse == -math.inf, math.inf)


def _seed(dropout_p):
    try:
        return new_seed() if float(dropout_p) > 0 else None
    except (TypeError, ValueError):
        return None  # api validates dropout_p and names it


def _attend(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
            return_attn_probs):
    window = _window(window_size)
    if not return_attn_probs:
        return api.flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window, softcap, alibi_slopes,
                                   deterministic=deterministic)
    seed = _seed(dropout_p)
    out, lse = api.flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window, softcap, alibi_slopes,
                                   deterministic=deterministic, return_lse=True, dropout_seed=seed)
    s_dmask = None
    if seed is not None:
        s_dmask = attn_probs.dense(q, k, scale=check_scale(softmax_scale, q.shape[-1]), causal=bool(causal),
                                   window=window, softcap=float(softcap), alibi_slopes=alibi_slopes, seed=seed,
                                   dropout_p=float(dropout_p))
    return out, _fa2_lse(lse), s_dmask


def _attend_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs):
    window = _window(window_size)
    max_seqlen_q, max_seqlen_k = _int_like(max_seqlen_q, "max_seqlen_q"), _int_like(max_seqlen_k, "max_seqlen_k")
    if not return_attn_probs:
        return api.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                          softmax_scale, causal, window, softcap, alibi_slopes,
                                          deterministic=deterministic)
    seed = _seed(dropout_p)
    out, lse = api.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                          softmax_scale, causal, window, softcap, alibi_slopes,
                                          deterministic=deterministic, return_lse=True, dropout_seed=seed)
    s_dmask = None
    if seed is not None:
        s_dmask = attn_probs.varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    scale=check_scale(softmax_scale, q.shape[-1]), causal=bool(causal), window=window,
                                    softcap=float(softcap), alibi_slopes=alibi_slopes, seed=seed,
                                    dropout_p=float(dropout_p))
    return out, _fa2_lse(lse), s_dmask


def _int_like(value, name: str):
    """Python int from an int-like (FA2 callers pass tensors' .item() or numpy ints); others pass
    through for the API to reject with its own message."""
    if isinstance(value, bool):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, Dv); with return_attn_probs
    (out, softmax_lse (B, Hq, Sq) float32, S_dmask or None)."""
    return _attend(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=NO_WINDOW,
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (B, S, 3, H, D)."""
    _check_packed(qkv, "qkv", 5, 2, 3, "(B, S, 3, H, D)")
    q, k, v = qkv.unbind(2)
    return _attend(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=NO_WINDOW,
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Sq, Hq, D), kv (B, Sk, 2, Hkv, D)."""
    _check_packed(kv, "kv", 5, 2, 2, "(B, Sk, 2, Hkv, D)")
    k, v = kv.unbind(2)
    return _attend(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Packed q (Tq, Hq, D), k/v (Tk, Hkv, D); sequence b is rows cu_seqlens[b]:cu_seqlens[b + 1].
    With block_table (B, max_blocks) int, k/v are pages (num_blocks, page_size, Hkv, D) and
    sequence b's keys are the first cu_seqlens_k[b + 1] - cu_seqlens_k[b] rows of its pages."""
    if block_table is not None:
        k, v = _gather_varlen_pages(k, v, block_table, cu_seqlens_k)
    return _attend_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                          causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=NO_WINDOW, softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (T, 3, H, D)."""
    _check_packed(qkv, "qkv", 4, 1, 3, "(T, 3, H, D)")
    q, k, v = qkv.unbind(1)
    return _attend_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                          window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (Tq, Hq, D), kv (Tk, 2, Hkv, D)."""
    _check_packed(kv, "kv", 4, 1, 2, "(Tk, 2, Hkv, D)")
    k, v = kv.unbind(1)
    return _attend_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                          causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def _check_packed(tensor, name: str, rank: int, dim: int, size: int, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != rank or tensor.shape[dim] != size:
        raise ValueError(f"{name}: expected a tensor {layout}, got {_describe(tensor)}")


# ----------------------------------------------------------------------------------------------
# Paged KV (block_table): gathered into contiguous tensors, then served by the ordinary paths.


def _check_pages(k_pages, v_pages, block_table, names=("k", "v")):
    for name, pages in zip(names, (k_pages, v_pages)):
        if not isinstance(pages, torch.Tensor) or pages.dim() != 4:
            raise ValueError(f"{name}: expected pages (num_blocks, page_block_size, Hkv, D) with block_table, "
                             f"got {_describe(pages)}")
    if k_pages.shape[:3] != v_pages.shape[:3]:
        raise ValueError(f"{names[1]}: expected (num_blocks, page_block_size, Hkv) = {tuple(k_pages.shape[:3])} "
                         f"like {names[0]}, got {tuple(v_pages.shape[:3])}")
    if (not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.is_floating_point()
            or block_table.dtype == torch.bool):
        raise ValueError(f"block_table: expected a 2-D integer tensor (batch, max_blocks_per_seq), "
                         f"got {_describe(block_table)}")
    if block_table.device != k_pages.device:
        raise ValueError(f"block_table: expected device {k_pages.device} like {names[0]}, got {block_table.device}")
    if block_table.numel() and (int(block_table.min()) < 0 or int(block_table.max()) >= k_pages.shape[0]):
        raise ValueError(f"block_table: expected page indices in [0, {k_pages.shape[0]}), "
                         f"got [{int(block_table.min())}, {int(block_table.max())}]")
    return block_table.to(device=k_pages.device, dtype=torch.int64)


def _gather_varlen_pages(k_pages, v_pages, block_table, cu_seqlens_k):
    table = _check_pages(k_pages, v_pages, block_table)
    if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.shape != (table.shape[0] + 1,):
        raise ValueError(f"cu_seqlens_k: expected shape ({table.shape[0] + 1},) = block_table's batch + 1, "
                         f"got {_describe(cu_seqlens_k)}")
    capacity = table.shape[1] * k_pages.shape[1]
    lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(device=k_pages.device, dtype=torch.int64)
    if lengths.numel() and int(lengths.max()) > capacity:
        raise ValueError(f"cu_seqlens_k: a sequence of {int(lengths.max())} keys exceeds its {table.shape[1]} pages "
                         f"of {k_pages.shape[1]} rows")
    used = torch.arange(capacity, device=k_pages.device)[None, :] < lengths[:, None]
    return tuple(pages[table].flatten(1, 2)[used] for pages in (k_pages, v_pages))


# ----------------------------------------------------------------------------------------------
# flash_attn_with_kvcache


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention over a (B, S_max, Hkv, D) cache, appending k/v at cache_seqlens first (FA2's meaning).

    rotary_cos/rotary_sin (seqlen_ro, rotary_dim / 2): the new k is rotated at positions
    cache_seqlens, cache_seqlens + 1, ...; q the same when causal or local, else every query at
    position cache_seqlens. cache_leftpad (B,): sequence b's keys start at cache row
    cache_leftpad[b] (positions count from there). block_table (B, max_blocks): k_cache/v_cache
    are pages (num_blocks, page_block_size, Hkv, D).
    """
    window = _window(window_size)
    if block_table is not None and cache_batch_idx is not None:
        raise NotImplementedError("flash_attn_with_kvcache: block_table with cache_batch_idx is not supported "
                                  "(FA2 refuses it too)")
    if block_table is not None and cache_leftpad is not None:
        raise NotImplementedError("flash_attn_with_kvcache: block_table with cache_leftpad is not supported "
                                  "(FA2 refuses it too)")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(cache, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor (B, S_max, Hkv, D), or pages with block_table, "
                            f"got {_describe(cache)}")
    if isinstance(cache_seqlens, torch.Tensor):
        # Kept as given (int32 or int64): a cast here truncated float lengths, took bools and wrapped int64 values
        # past 2**31 before any check could see them; the checks below and the core's see the values themselves.
        if cache_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cache_seqlens: expected an int or an int32 tensor, got a {cache_seqlens.dtype} tensor")
    elif cache_seqlens is not None:
        cache_seqlens = _int_like(cache_seqlens, "cache_seqlens")
    table = _check_pages(k_cache, v_cache, block_table, ("k_cache", "v_cache")) if block_table is not None else None
    if table is not None and isinstance(q, torch.Tensor) and q.dim() == 4 and table.shape[0] != q.shape[0]:
        # a row per sequence: the gathered cache's batch would otherwise be named as k_cache's
        raise ValueError(f"block_table: expected {q.shape[0]} rows (batch, max_blocks_per_seq), one per sequence "
                         f"of q, got shape {tuple(table.shape)}")
    capacity = k_cache.shape[1] * (table.shape[1] if table is not None else 1)
    if (rotary_cos is None) != (rotary_sin is None):
        missing = "rotary_sin" if rotary_sin is None else "rotary_cos"
        raise ValueError(f"{missing}: expected a table like the other of rotary_cos/rotary_sin, got None")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos: rotary embedding rotates the new k (and q); expected k and v to append, "
                             "got k=None")
        check_cos_sin(rotary_cos, rotary_sin, q.shape[-1], ("rotary_cos", "rotary_sin"), q.device)
        local = any(0 <= side < capacity for side in window)  # FA2: a side >= the cache length is unbounded
        q, k = _rotate(q, k, rotary_cos, rotary_sin, cache_seqlens, capacity, bool(causal) or local,
                       bool(rotary_interleaved))
    options = dict(softmax_scale=softmax_scale, causal=causal, window_size=window, softcap=softcap,
                   alibi_slopes=alibi_slopes, return_lse=return_softmax_lse, num_splits=num_splits)
    if table is not None:
        result = _paged_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, table, options)
    elif cache_leftpad is not None:
        result = _leftpad_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, options)
    else:
        result = kvcache.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, **options)
    if return_softmax_lse:
        out, lse = result
        return out, _fa2_lse(lse)
    return result


def _lengths(cache_seqlens, batch: int, capacity: int, device) -> torch.Tensor:
    if cache_seqlens is None:
        return torch.full((batch,), capacity, dtype=torch.int64, device=device)
    if isinstance(cache_seqlens, torch.Tensor):
        if not shape_is(cache_seqlens.shape, (batch,), ()) or cache_seqlens.is_floating_point():
            raise ValueError(f"cache_seqlens: expected an int or an int32 tensor ({batch},), "
                             f"got {_describe(cache_seqlens)}")
        return cache_seqlens.to(device=device, dtype=torch.int64).expand(batch)
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        return torch.full((batch,), cache_seqlens, dtype=torch.int64, device=device)
    raise ValueError(f"cache_seqlens: expected an int or an int32 tensor ({batch},), got {_describe(cache_seqlens)}")


def _rotate(q, k, cos, sin, cache_seqlens, capacity, sequential_q, interleaved):
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"q, k: expected 4-D tensors (B, S, H, D) with rotary_cos/rotary_sin, got "
                         f"{_describe(q)} and {_describe(k)}")
    start = _lengths(cache_seqlens, q.shape[0], capacity, q.device)
    k_positions = start[:, None] + torch.arange(k.shape[1], device=q.device)[None, :]
    q_steps = torch.arange(q.shape[1], device=q.device) if sequential_q else q.new_zeros(q.shape[1], dtype=torch.int64)
    q_positions = start[:, None] + q_steps[None, :]
    return rotate_at(q, cos, sin, q_positions, interleaved), rotate_at(k, cos, sin, k_positions, interleaved)


def _check_paged_capacity(cache_seqlens, table, page: int, new: int, batch: int, device) -> None:
    """Lengths past what block_table's pages hold, refused before the pages are gathered. Device lengths are read
    only where the core reads index values (problem.values_checked): else trusted, with no sync per call."""
    if isinstance(cache_seqlens, torch.Tensor) and not values_checked(cache_seqlens):
        return
    capacity = table.shape[1] * page
    lengths = _lengths(cache_seqlens, batch, capacity, device).tolist()
    over = [n for n in lengths if n + new > capacity]
    if over:
        raise InputError(  # FA2's own check (mha_fwd_kvcache) raises RuntimeError
            f"cache_seqlens: expected lengths + {new} new tokens <= {capacity}, what block_table's {table.shape[1]} "
            f"blocks per sequence of {page} tokens hold, got {lengths}")


def _paged_kvcache(q, k_pages, v_pages, k, v, cache_seqlens, table, options):
    """Gather each sequence's pages into a contiguous cache, attend (appending there), then write
    the appended rows back into their pages."""
    page = k_pages.shape[1]
    _check_paged_capacity(cache_seqlens, table, page, 0 if k is None else k.shape[1], q.shape[0], q.device)
    k_lin, v_lin = k_pages[table].flatten(1, 2), v_pages[table].flatten(1, 2)
    result = kvcache.flash_attn_with_kvcache(q, k_lin, v_lin, k, v, cache_seqlens, None, **options)
    if k is not None and k.shape[1]:
        start = _lengths(cache_seqlens, q.shape[0], k_lin.shape[1], q.device)
        positions = start[:, None] + torch.arange(k.shape[1], device=q.device)[None, :]
        rows = torch.arange(q.shape[0], device=q.device)[:, None]
        pages, offsets = table.gather(1, positions // page), positions % page
        k_pages[pages, offsets] = k_lin[rows, positions]
        v_pages[pages, offsets] = v_lin[rows, positions]
    return result


def _leftpad_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, options):
    """One call per batch row on the cache view that starts at the row's cache_leftpad."""
    batch = q.shape[0]
    if (not isinstance(cache_leftpad, torch.Tensor) or cache_leftpad.shape != (batch,)
            or cache_leftpad.is_floating_point() or cache_leftpad.dtype == torch.bool):
        raise ValueError(f"cache_leftpad: expected an integer tensor ({batch},), got {_describe(cache_leftpad)}")
    pads = cache_leftpad.tolist()
    lengths = _lengths(cache_seqlens, batch, k_cache.shape[1], q.device).tolist()
    rows = cache_batch_idx.tolist() if isinstance(cache_batch_idx, torch.Tensor) else list(range(batch))
    if len(rows) != batch:
        raise ValueError(f"cache_batch_idx: expected {batch} indices, got {len(rows)}")
    if isinstance(cache_batch_idx, torch.Tensor):  # each row is a slice bound: a negative one picked another row
        kvcache._check_batch_idx(cache_batch_idx, batch, k_cache.shape[0], q.device, appending=k is not None,
                                 host_values=rows)
    for b, (pad, length) in enumerate(zip(pads, lengths)):
        if not 0 <= pad <= length:
            raise ValueError(f"cache_leftpad: expected 0 <= cache_leftpad[{b}] <= cache_seqlens[{b}] = {length}, "
                             f"got {pad}")
    slopes = options.pop("alibi_slopes")
    outs, lses = [], []
    for b, (pad, length, row) in enumerate(zip(pads, lengths, rows)):
        row_slopes = slopes[b : b + 1] if slopes is not None and slopes.dim() == 2 else slopes
        result = kvcache.flash_attn_with_kvcache(
            q[b : b + 1], k_cache[row : row + 1, pad:], v_cache[row : row + 1, pad:],
            None if k is None else k[b : b + 1], None if v is None else v[b : b + 1], length - pad, None,
            alibi_slopes=row_slopes, **options)
        if options["return_lse"]:
            outs.append(result[0])
            lses.append(result[1])
        else:
            outs.append(result)
    out = torch.cat(outs, dim=0)
    return (out, torch.cat(lses, dim=0)) if options["return_lse"] else out


def _get_block_size_n(device=None, head_dim=None, is_dropout=False, is_causal=False) -> int:
    """The key-block width of the S_dmask encoding that return_attn_probs returns (FA2 tests decode
    S_dmask with it). The shim's encoding uses one width for every device and head dim."""
    return attn_probs.BLOCK_N


__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]
