"""Block sizes per (padded head dim, dtype, causal): a table, not an autotuner.

The table keys never include a sequence length, so one compiled kernel serves every length (lengths
are passed unspecialized). Entries were chosen for the H100 (228 KiB shared memory per SM): the
forward keeps one Q tile in registers and streams K/V tiles, so BLOCK_N * (Dqk + Dv) elements per
pipeline stage must fit; head dim 256 halves the tiles. float32 halves BLOCK_N again (twice the bytes).
On CPU (Triton's interpreter, for tests) every block is 16, the smallest tl.dot accepts, so the small test
shapes cross many block boundaries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Blocks:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False  # forward only: stream K/V through TMA descriptors where the layout allows (tma.py)


# Triton decides interpretation when a kernel is decorated (at import), so later changes of the
# variable do not matter: read once instead of on every call's supports().
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    return _INTERPRETING


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids (triton.cdiv is a ConstexprFunction: ~5 µs of host time a call)."""
    return -(-a // b)


def padded_dim(dim: int) -> int:
    """The power-of-two tile width that holds `dim` (at least 16, tl.dot's minimum)."""
    return max(16, 1 << (dim - 1).bit_length())


_TINY = Blocks(16, 16, 1, 1)
_HALF = (torch.float16, torch.bfloat16)

# (padded max(Dqk, Dv)) -> Blocks, for 2-byte dtypes.
# D 64 and 128 at N > SMALL_N, bf16, H200, triton 3.6, side by side (benchmarks/triton/forward_variants.py,
# results/h200-forward-variants-2026-12-04-session4*.log), TFLOP/s at N = 4k / 16k, the entry before -> now:
# - D 128, K/V through TMA descriptors and (128, 128, 8, 3): non-causal 457 / 480 -> 515 / 536, causal
#   416 / 464 -> 441 / 517 (0.86-0.91x cuDNN). Bitwise the outputs of the pointer loads with the same blocks.
#   (128, 128, 8, 2) with TMA crashes ptxas (-11).
# - D 64, (128, 64, 8, 4): non-causal 378 / 387 -> 417 / 426, causal 357 / 374 -> 374 / 413 (0.90-0.93x cuDNN);
#   TMA was no faster there (406 / 412 non-causal), so the pointer loads stay.
_FORWARD = {16: Blocks(128, 64, 4, 3), 32: Blocks(128, 64, 4, 3), 64: Blocks(128, 64, 8, 4),
            128: Blocks(128, 128, 8, 3, tma=True), 256: Blocks(64, 32, 4, 2)}
_FORWARD_CAUSAL = {128: Blocks(128, 128, 8, 3, tma=True)}
# Short sequences (max query length <= SMALL_N): more, smaller programs fill the SMs
# (benchmarks/triton/device_bench.py forward sweep, H200 2026-11-21: D=128 N=512 non-causal 310 TFLOP/s
# with (64, 64, 4, 3) against <= 215 with (128, 64, 8, 3)). A few tables by length tier (this one, the long one,
# and _FORWARD_SHORT_HALF below), so a few compiled variants, never one per length.
SMALL_N = 1024
_FORWARD_SMALL = {16: Blocks(64, 64, 4, 3), 32: Blocks(64, 64, 4, 3), 64: Blocks(128, 64, 8, 3),
                  128: Blocks(64, 64, 4, 3)}
_FORWARD_SMALL_CAUSAL = {16: Blocks(64, 64, 4, 3), 32: Blocks(64, 64, 4, 3), 64: Blocks(64, 64, 4, 3),
                         128: Blocks(64, 64, 4, 3)}
# D 128, 2-byte dtypes, the shortest sequences: (64, 32, 4, 3), bf16, H100, triton 3.6, B x N = 16k, H x D = 2048
# (benchmarks/triton/forward_variants.py --small, results/h100-forward-variants-small-2026-12-06-session19*.log),
# ms against (64, 64, 4, 3): causal N 512 0.151-0.153 / 0.177, N 1024 0.234 / 0.249; non-causal N 512
# 0.213-0.217 / 0.227-0.229, but N 1024 0.385 / 0.359, so non-causal takes it to N 512 only. Neighbours timed and
# slower: (64, 64, 4, 2), (64, 64, 8, 3), (32, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), TMA (64, 64, 4, 3).
# float32 keeps the entries above (its halved tiles were what the full matrix passed with).
_FORWARD_SHORT_HALF = {(128, True): (SMALL_N, Blocks(64, 32, 4, 3)), (128, False): (512, Blocks(64, 32, 4, 3))}
# Backward, dK/dV pass: block_n keys stay resident, block_m query rows stream.
# d 32/64 timed side by side (forward + backward, bf16, B=4, H=16, L=4096, H200, triton 3.6: d=32
# (64, 128, 4, 2) 2.19 / 1.62 ms non-causal / causal, best of six; d=64 (64, 64, 4, 2) 3.48 / 2.06 ms
# against 3.89 / 2.38 for the racy (32, 128, 4, 2)): benchmarks/results/h200-backward-race-2026-12-03.log.
# d 128: (128, 64, 8, 2) against the earlier (64, 128, 8, 2), forward + backward bf16, H200, triton 3.6, side by
# side with SDPA-flash: B=4 H=16 N=4096 6.20 / 4.49 ms (was 9.78 / 6.08) non-causal / causal, GQA B=1 32/8 heads
# N=8192 11.76 / 6.60 ms (was 17.11 / 10.25); bitwise repeatable, the same gradients:
# benchmarks/results/h200-backward-sweep-d128-2026-12-04.log (benchmarks/triton/backward_sweep.py).
_BACKWARD_KV = {16: Blocks(64, 128, 4, 2), 32: Blocks(64, 128, 4, 2), 64: Blocks(64, 64, 4, 2),
                128: Blocks(128, 64, 8, 2), 256: Blocks(32, 64, 8, 1)}
# Why no dK/dV entry streams fewer than 64 query rows through a pipelined loop (the dK race found by
# FlashAttention-2's tests on an H200, triton 3.6): with block_m = 32 the Q K^T and dO V^T products
# (32 rows) compile to mma.sync while dV and dK (block_n rows) compile to async wgmma reading the
# q/dO tiles straight from shared memory. The pipeliner gave those tiles ONE buffer but let the
# wgmma stay in flight (warp_group_dot_wait pendings=3) past the prefetch that overwrites the buffer
# for the next step, so dK read half-replaced q rows: wrong and unrepeatable (d 64: 0.15 max error
# in fp16, 4182 elements differing between runs). With block_m >= 64 every product is a wgmma and
# the tiles are double-buffered with full waits; with one stage nothing is prefetched.
# benchmarks/triton/backward_repeatability.py checks every entry on a GPU; _check_backward_kv refuses
# the shape here.
MIN_PIPELINED_KV_ROWS = 64
# Backward, dQ pass: block_m query rows stay resident, block_n keys stream.
_BACKWARD_Q = {16: Blocks(128, 32, 4, 2), 32: Blocks(128, 32, 4, 2), 64: Blocks(128, 32, 4, 2),
               128: Blocks(128, 64, 8, 2), 256: Blocks(64, 32, 8, 1)}


# Short sequences (max(Lq, Lk) <= SMALL_BACKWARD_N), d 128: more, smaller dK/dV programs. The cuda suite's shapes
# (B x N = 16k tokens, 16 heads, bf16, H200, triton 3.6, fwd+bwd side by side with SDPA-flash): (64, 64, 4, 2)
# against (128, 64, 8, 2) 1.633 / 1.460 ms (was 1.786 / 1.670) non-causal / causal at N 512, 2.014 / 1.740 (2.168 /
# 1.927) at 1024, 3.163 / 2.239 (3.444 / 2.546) at 2048; bitwise repeatable
# (benchmarks/results/h200-backward-sweep-small-2026-12-04-session5.log, backward_sweep.py --small). dQ: no shape
# was better at every length, it keeps its entry.
SMALL_BACKWARD_N = 2048
_BACKWARD_KV_SMALL = {128: Blocks(64, 64, 4, 2)}


def _check_backward_kv(table: dict) -> None:
    for dim, chosen in table.items():
        if chosen.num_stages > 1 and chosen.block_m < MIN_PIPELINED_KV_ROWS:
            raise ValueError(f"_BACKWARD_KV[{dim}]: expected block_m >= {MIN_PIPELINED_KV_ROWS} or one stage "
                             f"(a pipelined dK/dV loop with fewer rows races), got {chosen}")


_check_backward_kv(_BACKWARD_KV)
_check_backward_kv(_BACKWARD_KV_SMALL)


def _pick(table: dict, dim: int, dtype: torch.dtype, device_type: str, override: dict | None = None) -> Blocks:
    if device_type == "cpu":
        return _TINY
    key = padded_dim(dim)
    chosen = (override or {}).get(key, table[key])
    if dtype == torch.float32:  # twice the bytes per element: halve the streamed tile (pointer loads: TMA unmeasured)
        return Blocks(chosen.block_m, max(16, chosen.block_n // 2), chosen.num_warps, max(1, chosen.num_stages - 1))
    return chosen


# float32 keeps the forward shapes it had before the D 64 / 128 entries changed for bf16 (halving the new ones
# was never run on a GPU).
_FORWARD_FLOAT32 = {64: Blocks(128, 32, 4, 2), 128: Blocks(128, 32, 8, 2)}


def forward_blocks(dim: int, dtype: torch.dtype, causal: bool, device_type: str = "cuda", seqlen_q: int = 0) -> Blocks:
    short = _FORWARD_SHORT_HALF.get((padded_dim(dim), bool(causal)))
    if short is not None and 0 < seqlen_q <= short[0] and device_type != "cpu" and dtype in _HALF:
        return short[1]
    if 0 < seqlen_q <= SMALL_N:
        return _pick(_FORWARD, dim, dtype, device_type, _FORWARD_SMALL_CAUSAL if causal else _FORWARD_SMALL)
    if device_type != "cpu" and dtype == torch.float32 and padded_dim(dim) in _FORWARD_FLOAT32:
        return _FORWARD_FLOAT32[padded_dim(dim)]
    return _pick(_FORWARD, dim, dtype, device_type, _FORWARD_CAUSAL if causal else None)


# float32 keeps the dK/dV shape it had before the d 128 entry changed (halving (128, 64, 8, 2) would stream
# 128-row fp32 Q/dO tiles, never measured on a GPU): what the full matrix last passed with.
_BACKWARD_KV_FLOAT32 = {128: Blocks(64, 64, 8, 1)}


def backward_kv_blocks(dim: int, dtype: torch.dtype, causal: bool, device_type: str = "cuda",
                       seqlen: int = 0) -> Blocks:
    """seqlen: max(Lq, Lk) (0: unknown, the long-sequence entry)."""
    if device_type != "cpu" and dtype == torch.float32 and padded_dim(dim) in _BACKWARD_KV_FLOAT32:
        return _BACKWARD_KV_FLOAT32[padded_dim(dim)]
    return _pick(_BACKWARD_KV, dim, dtype, device_type, _BACKWARD_KV_SMALL if 0 < seqlen <= SMALL_BACKWARD_N else None)


# dQ of half-precision d 128 over more than LONG_BACKWARD_Q_N keys without a sliding window: a third stage. H100,
# triton 3.6, session 23 (benchmarks/triton/backward_sweep.py, fwd+bwd with the dK/dV entry fixed; gradients bitwise
# equal to the 2-stage entry's and repeatable): B x N = 16k, 16 heads: full / causal at 2k 2.606 / 1.709 ms against
# 2.784 / 1.749, at 4k 5.050 / 3.288 against 5.320 / 3.423; GQA 32/8 at 8k 10.25 / 5.745 against 10.88 / 5.944;
# FlexAttention's causal 8k problem 5.656 against 6.074. A window of 1024 keys at 8k ran 5% slower with it (2.056
# against 1.949 ms), and shorter sequences were not timed: both keep _BACKWARD_Q. The GPU's gradient and backward
# tests passed on the H100 with (128, 64, 8, 3) for every d 128 call (MFA_TRITON_FULL=1, 108 cases, among them the
# repeatability check's 2109-key bf16 d 128 calls, 20 runs bitwise equal).
LONG_BACKWARD_Q_N = 1024
_BACKWARD_Q_LONG = {128: Blocks(128, 64, 8, 3)}


def backward_q_blocks(dim: int, dtype: torch.dtype, causal: bool, device_type: str = "cuda", seqlen: int = 0,
                      windowed: bool = False) -> Blocks:
    """seqlen: max(Lq, Lk) (0: unknown, the table's entry); windowed: a sliding window bounds the keys."""
    long = _BACKWARD_Q_LONG.get(padded_dim(dim))
    if long is not None and device_type != "cpu" and dtype in _HALF and seqlen > LONG_BACKWARD_Q_N and not windowed:
        return long
    return _pick(_BACKWARD_Q, dim, dtype, device_type)
