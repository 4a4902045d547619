"""One query row per sequence over a (possibly quantized) cache, on CPU: dequantize, then torch's fused kernel.

The common decode step (one new token, every row the same cache length, no ALiBi or softcap) is a
plain attention of one row over the keys [start, L) its window leaves visible. On CPU, torch's fused
flash kernel (the one SDPA uses) computes it in one call that also returns the log-sum-exp; the
block loop of decode.py costs some sixty small ops per key block instead. The G query heads of a KV
head are stacked as G rows of one problem (one row each, no mask: the rows are independent), so
GQA needs no repeated K/V. The cache is read in chunks of CHUNK_BYTES of widened keys and values
(the full-precision cache never exists) and the chunks merge exactly by their log-sum-exps, with the
sinks joining once (kernels/merge.py). Codes whose scales factor out of the products (one per key and head:
int8, fp8; one per key, head and group of D: nf4) skip the dequantization and the fused kernel:
cpu_scaled_codes.py widens them and applies the scales after the products. Everything else takes decode.py's
loop.

The kernel's one departure from our semantics: it returns 0 for a query row holding NaN (ours keeps
NaN). Such a call takes the loop, which propagates it. NaN or inf in K/V propagate like ours.
"""

from __future__ import annotations

import dataclasses

import torch

from ..contract import CacheSide, DecodeCall
from ..merge import merge_partials
from . import cpu_int8_products, cpu_scaled_codes
from .cache_blocks import span_block, values_dim

ENABLED = True  # read at call time: tests turn it off to cover the loop on CPU too
# Widened K and V of one chunk, all rows and heads: small enough to stay in a core's cache between being written
# and read by the kernel (a loaded 2-core x86 host, smollm-shaped int8 decode at 16k keys: 2 MiB chunks 1.7x
# SDPA on the fp32 cache, 32 MiB 0.8x), large enough that the per-chunk ops stay a small cost.
CHUNK_BYTES = 2 << 20
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# torch's CPU flash kernel with its log-sum-exp output; None where this torch lacks it (the loop serves).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def serves(call: DecodeCall, lengths: list[int]) -> bool:
    """Whether this call is the plain one-row decode this path computes exactly (lengths: seqlens_k on the host)."""
    q = call.q
    return (ENABLED and _FLASH_CPU is not None and q.device.type == "cpu" and q.dtype in _DTYPES
            and q.shape[1] == 1 and _host_rows(call.cache_batch_idx) and call.alibi_slopes is None
            and call.options.softcap == 0 and len(set(lengths)) == 1 and _same_head_dims(call)
            and not bool(q.isnan().any()))


def _host_rows(cache_batch_idx) -> bool:
    """No row map, or one on the host, where reading it is free (decode.py has checked its values)."""
    return cache_batch_idx is None or cache_batch_idx.device.type == "cpu"


def _same_head_dims(call: DecodeCall) -> bool:
    """The fused kernel takes one head dim for Q, K and V (D_v != D_qk, e.g. MLA, takes the loop); scaled codes
    need no such thing, their products are plain matmuls."""
    return cpu_scaled_codes.serves(call) or values_dim(call.values) == call.q.shape[-1]


def decode(call: DecodeCall, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, 1, Hq, Dv) in q's dtype, lse (B, Hq, 1) float32) over keys [start, length) of every row.

    A row map (cache_batch_idx: batched generate's rows grouped by their padding) is served run by run: rows
    that map to consecutive cache rows read those rows as a view (no gather of a row's whole cache)."""
    if call.cache_batch_idx is None:
        return _decode(call, length)
    parts = [_decode(_run_call(call, first, cache_row, count), length)
             for first, cache_row, count in _runs(call.cache_batch_idx.tolist())]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([out for out, _ in parts]), torch.cat([lse for _, lse in parts])


def _runs(rows: list[int]) -> list[tuple[int, int, int]]:
    """(first query row, its cache row, count) of each run of query rows mapped to consecutive cache rows."""
    runs = []
    for b, row in enumerate(rows):
        if runs and runs[-1][1] + runs[-1][2] == row:
            first, cache_row, count = runs[-1]
            runs[-1] = (first, cache_row, count + 1)
        else:
            runs.append((b, row, 1))
    return runs


def _run_call(call: DecodeCall, first: int, cache_row: int, count: int) -> DecodeCall:
    """The call of query rows [first, first + count) over cache rows [cache_row, cache_row + count), as views."""
    return dataclasses.replace(call, q=call.q[first:first + count], keys=_side_rows(call.keys, cache_row, count),
                               values=_side_rows(call.values, cache_row, count),
                               seqlens_k=call.seqlens_k[first:first + count], cache_batch_idx=None)


def _side_rows(side: CacheSide, row: int, count: int) -> CacheSide:
    scales = side.scales
    if scales is not None and scales.shape[0] > 1:  # one batch row of scales broadcasts to every cache row
        scales = scales[row:row + count]
    return dataclasses.replace(side, codes=side.codes[row:row + count], scales=scales)


def _decode(call: DecodeCall, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, values, options = call.q, call.values, call.options
    batch, _, heads_q, _ = q.shape
    start = 0 if options.window_left < 0 else max(0, length - 1 - options.window_left)
    if cpu_int8_products.serves(call, start, length):
        chunk_parts = cpu_int8_products.parts
    else:
        chunk_parts = cpu_scaled_codes.parts if cpu_scaled_codes.serves(call) else _fused_parts
    parts = chunk_parts(call, start, length) if start < length else []
    if not parts:  # no visible key: out 0, lse -inf (the sinks' logits after the merge)
        parts.append((q.new_zeros((batch, 1, heads_q, values_dim(values)), dtype=torch.float32),
                      q.new_full((batch, heads_q, 1), -torch.inf, dtype=torch.float32)))
    out, lse = merge_partials(parts, call.sinks)
    return out.to(q.dtype), lse


def _fused_parts(call: DecodeCall, start: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(out (B, 1, Hq, Dv), lse (B, Hq, 1)) of each chunk of keys [start, length): dequantized K/V through torch's
    fused kernel."""
    q, keys, values = call.q, call.keys, call.values
    batch, _, heads_q, dim = q.shape
    heads_kv = keys.codes.shape[2]
    rows = _unit_last(q.reshape(batch, heads_kv, heads_q // heads_kv, dim).to(torch.float32))  # (B, Hkv, G, D)
    per_key = batch * heads_kv * (dim + values_dim(values)) * 4
    chunk = max(1, CHUNK_BYTES // per_key)
    parts = []
    for first in range(start, length, chunk):
        count = min(chunk, length - first)
        k_block = span_block(keys, first, count, torch.float32)  # (B, Hkv, count, D)
        v_block = span_block(values, first, count, torch.float32)
        out, lse = _FLASH_CPU(rows, _unit_last(k_block), _unit_last(v_block), 0.0, False, scale=call.options.scale)
        parts.append((out.reshape(batch, 1, heads_q, -1), lse.reshape(batch, heads_q, 1)))
    return parts


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """t with a unit-stride last dim, as the aten kernel reads it without checking (a strided, permuted or
    broadcast D gave garbage); a copy only where the stride is not 1 already."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()
