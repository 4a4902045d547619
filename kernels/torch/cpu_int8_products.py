"""One query row per sequence over int8 codes on CPU, through torch's integer matmul: the codes are read as stored.

cpu_scaled_codes.py widens the codes to float32 before each product: a read of the codes, a write and a read of
four times their bytes, so on a long cache it moves more memory than SDPA over a float32 cache does.
`torch._int_mm` (int8 x int8 -> int32) multiplies the codes as they lie, so an int8 cache is read once, at a
quarter of a float32 cache's bytes. torch computes it with oneDNN only on x86 CPUs with AVX512-VNNI (and oneDNN
enabled); elsewhere, Apple Silicon included, it runs a scalar loop far slower than the widening path, so the
path serves only where that check passes (`int_mm_is_fast`).

Its other operand must be int8 too. The float operand of each product (the scaled query rows, then the
probabilities times the value scales) is written exactly enough as a few int8 rows: each row, over its largest
magnitude, as a fixed-point integer of n bytes (1 at 2^(8 n - 2)), whose bytes, balanced to [-128, 127], are
its digits in base 256 (x = d0 + 2^8 d1 + 2^16 d2 + ...). The n int32 products are combined in float32 by their
place values. The query rows take 3 bytes (23 bits: a score as exact as a float32 dot product), the weights 4
(31 bits: their rounding, which adds up over the keys, stays below float32's), so the result is as exact as the
float32 products of cpu_scaled_codes (tests/test_cpu_int8_products.py: within the reference rule on 20k-key
caches, and equal to that path to float32 rounding).

Exact integer sums: a digit is at most 128 in magnitude and a code too (int8), so a key adds at most 2^14 to a
product and CHUNK_KEYS = 2^16 keys stay below 2^31. Longer spans are cut into chunks merged by their
log-sum-exps (cpu_fused_decode), as the window's start is.

When it pays (MIN_KEYS, MIN_HEAD_DIM): a call costs some forty small ops plus two integer matmuls per (row, KV
head), against cpu_scaled_codes' dozen ops per chunk, so it serves long spans of head dims >= 64 only. Measured
on a loaded 2-core x86 host (AVX512-VNNI), float32 queries, one row, medians of interleaved rounds, each call
over another layer's cache (benchmarks/cpu_quant_decode.py --layers), as time of cpu_scaled_codes / this path:
  D 128 (32/8, 12/2, 8/1 heads): 1.4-1.7 at 16k keys, 1.4-3.0 at 32k; 32/8 1.66 at 4k, 8/1 0.91 at 4k;
  D 64 (9/3, 6/2, 8/4, 24/8, 32/8, 14/2, 16/16 heads): 0.85-1.33 at 16k and 32k, 0.64-0.82 at 4k;
  bfloat16 queries, 16k keys: 9/3 D 64 1.33, 32/8 D 64 0.85, 32/8 D 128 1.58;
  4 rows of 32/8 D 64 (32 (row, KV head) pairs): 0.71 at 8k keys, 0.36 at 32k (hence MAX_ITEMS).
In a model's decode step this path gains more than the call alone shows (likely because the widened copies compete
with the weights for the caches; not verified): generating at 8k keys with MFAQuantizedCache("int8"), a float32
smollm-135m-shaped model (9/3 heads, D 64) decoded 9.4 tok/s against 7.5 through cpu_scaled_codes (SDPA on a
float32 cache: 9.9), and a 16-layer 16/4-head D 64 model 9.5 against 9.0 (SDPA 7.3), three rounds each.
Hence from 8192 keys at D >= 64, for up to 8 (row, KV head) pairs. The query must be finite: a fixed point has no
NaN or inf (cpu_scaled_codes serves those rows).
"""

from __future__ import annotations

import torch

from ..contract import CacheSide, DecodeCall
from ..launch import new_output
from .cpu_scaled_codes import scale_per_key

_INT_MM = getattr(torch, "_int_mm", None)  # absent from old torch builds: cpu_scaled_codes serves
ENABLED = True  # read at call time: tests turn it off to cover the widening path with the same formats
MIN_KEYS = 8192  # visible keys from which this path serves (see the module docstring)
MAX_ITEMS = 8  # (row, KV head) pairs up to which it serves: its per-chunk buffers grow with them (docstring)
# Head dims from which it serves (see the module docstring). Never below 2: torch's integer matmul returned
# garbage for a (1, n) operand with unit strides both ways, which a key side of D = 1 would be.
MIN_HEAD_DIM = 64
# Bytes of each fixed point: the query rows' 23 bits keep each score as exact as a float32 product does; the
# weights' 31 bits keep the sum over many keys so (fewer lose accuracy on long caches, tests/test_cpu_int8_products.py).
QUERY_BYTES, WEIGHT_BYTES = 3, 4
CHUNK_KEYS = 1 << 16  # keys per integer product at most: each adds at most 2^14, so the int32 sums stay exact
_BALANCE = 0x808080  # +128 on each low byte, then flip its top bit: the bytes read as signed digits in [-128, 127]


def int_mm_is_fast() -> bool:
    """Whether torch's integer matmul runs on oneDNN here: its CPU kernel asks for oneDNN (built and enabled) and
    AVX512-VNNI, and otherwise loops over the outputs one scalar product at a time."""
    vnni = getattr(torch.cpu, "_is_vnni_supported", None)  # torch's own probe of the same flag; absent: unknown
    return (_INT_MM is not None and vnni is not None and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and bool(vnni()))


def serves(call: DecodeCall, start: int, length: int) -> bool:
    """Whether both sides are int8 codes with one scale per key and head, the head dims are not tiny, the visible
    span is long enough to pay, torch's integer matmul is the fast one, and the query is finite (a host read: this
    path runs on CPU only)."""
    items = call.q.shape[0] * call.keys.codes.shape[2]
    return (ENABLED and length - start >= MIN_KEYS and items <= MAX_ITEMS and int_mm_is_fast()
            and _int8_per_key(call.keys)
            and _int8_per_key(call.values) and min(call.q.shape[-1], call.values.codes.shape[-1]) >= MIN_HEAD_DIM
            and bool(torch.isfinite(call.q).all()))


def _int8_per_key(side: CacheSide) -> bool:
    return side.format == "int8" and side.scales.shape[-1] == 1


def parts(call: DecodeCall, start: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(out (B, 1, Hq, Dv) float32, lse (B, Hq, 1) float32) of each chunk of keys [start, length)."""
    q, keys, values = call.q, call.keys, call.values
    batch, _, heads_q, dim = q.shape
    heads_kv = keys.codes.shape[2]
    group = heads_q // heads_kv
    rows = q.reshape(batch * heads_kv, group, dim).to(torch.float32) * call.options.scale  # (B * Hkv, G, D)
    q_digits, q_top = _digits(rows, QUERY_BYTES)  # (B * Hkv, bytes * G, D) int8, (B * Hkv, G, 1)
    found = []
    for first in range(start, length, CHUNK_KEYS):
        count = min(CHUNK_KEYS, length - first)
        # Scores: (B * Hkv, G, count), the query's place values and step, then each key's scale.
        products = _products(q_digits, keys.codes[:, first:first + count], transpose=True)
        scores = _placed(products, QUERY_BYTES, group).mul_(q_top)
        scale_per_key(scores, keys, first, count, batch)
        # No -inf to guard: every key of the chunk is visible (the window only moved `start`).
        top = scores.amax(dim=-1, keepdim=True)
        weights = scores.sub_(top).exp_()
        total = weights.sum(dim=-1, keepdim=True)  # >= 1 (the top key's weight)
        scale_per_key(weights, values, first, count, batch)
        w_digits, w_top = _digits(weights, WEIGHT_BYTES)
        out = _placed(_products(w_digits, values.codes[:, first:first + count], transpose=False), WEIGHT_BYTES, group)
        out.mul_(w_top).div_(total)  # (B * Hkv, G, Dv); w_top / total alone could fall below float32's normals
        lse = top.add_(total.log_())
        found.append((out.reshape(batch, 1, heads_q, -1), lse.reshape(batch, heads_q, 1)))
    return found


def _digits(x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, R, C) float32, finite -> (digits (N, count * R, C) int8, top (N, R, 1)): row r of x over its largest
    magnitude `top`, as a fixed-point integer of `count` bytes (1 at 2^(8 count - 2), so the top byte stays in
    [-64, 64]), digit row i * R + r holding byte i. _placed's place values include the fixed point's 1, so
    x ~= top * sum_i place_i digits[i * R + r]."""
    n, r, c = x.shape
    top = x.abs().amax(dim=-1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny)
    fixed = (x / top).mul_(_fixed_one(count)).round_().to(torch.int32)  # one / top would overflow for a tiny top
    balance = _BALANCE & ((1 << (8 * (count - 1))) - 1)  # the low bytes
    fixed.add_(balance).bitwise_xor_(balance)  # each low byte now reads as a signed digit in [-128, 127]
    digits = new_output((n, count, r, c), torch.int8, x.device)
    digits[:, 0].copy_(fixed)  # a narrowing copy keeps the low byte (two's complement)
    for i in range(1, count):
        digits[:, i].copy_(fixed >> (8 * i))
    return digits.view(n, count * r, c), top


def _fixed_one(count: int) -> float:
    return float(1 << (8 * count - 2))


def _placed(products: torch.Tensor, count: int, group: int) -> torch.Tensor:
    """(N, count * G, M) int32 products of the digit rows -> (N, G, M) float32: each weighted by its place value
    over the fixed point's 1 (powers of two: exact), i.e. in units of the row's top."""
    n, _, m = products.shape
    places = torch.tensor([256.0 ** i / _fixed_one(count) for i in range(count)], dtype=torch.float32)
    weighted = torch.matmul(places.view(1, 1, count), products.view(n, count, group * m).to(torch.float32))
    return weighted.view(n, group, m)


def _products(digits: torch.Tensor, codes: torch.Tensor, *, transpose: bool) -> torch.Tensor:
    """digits (B * Hkv, R, K) int8 times the codes (B, count, Hkv, D) of each (row, KV head): with transpose the
    keys' codes as (D, count) (K = D), else the values' as (count, D) (K = count) -> (B * Hkv, R, count or D)."""
    batch, count, heads, dim = codes.shape
    out = new_output((batch * heads, digits.shape[1], count if transpose else dim), torch.int32, digits.device)
    for b in range(batch):
        for h in range(heads):
            item = b * heads + h
            side = _row_major(codes[b, :, h])  # (count, D)
            _INT_MM(digits[item], side.t() if transpose else side, out=out[item])
    return out


def _row_major(side: torch.Tensor) -> torch.Tensor:
    """side as the integer matmul reads it right: unit-stride rows that do not overlap (a cache's (B, S, H, D)
    codes give rows Hkv * D apart: no copy). Rows 0 or 1 apart (a broadcast cache) came back wrong, and rows of
    another element stride made it warn and fall back to a slow loop; those are copied first."""
    count, dim = side.shape
    if side.stride(1) == 1 and (count == 1 or side.stride(0) >= dim):
        return side
    return side.contiguous()

