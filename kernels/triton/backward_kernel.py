"""Backward kernels (FlashAttention-2's recomputation, without atomics).

- dK/dV: one program per (key block, batch * KV head). It walks the query blocks of every query
  head of its GQA group, so dK/dV come out already reduced to KV heads, deterministically.
- dQ: one program per (query block, batch * query head), walking key blocks like the forward; it
  also writes dS when the additive mask needs a gradient.
- delta: delta_i = rowsum(dO_i * O_i) - dLSE_i, beforehand, one pass over O and dO.
Probabilities are recomputed from the saved LSE in base 2; rows with LSE = -inf (nothing visible) get P = 0.
"""

import triton
import triton.language as tl

from .common import (dot, head_hash, keep_tile, load_rows, operand, query_block_band, score_unit, sequence_bounds,
                     split_range, stored, transform_scores, visible)


@triton.jit
def _query_rows(q_base, do_base, lse_base, delta_base, rows, row_ok, stride_qm, stride_qd, stride_om, stride_od,
                stride_lm, offs_dk, offs_dv, HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr,
                MASK_KIND: tl.constexpr):
    """What the backward needs of a block of query rows: q, dO, the LSE in score units and delta."""
    q = load_rows(q_base, rows, row_ok, stride_qm, offs_dk, stride_qd, HEAD_DQK)
    do = load_rows(do_base, rows, row_ok, stride_om, offs_dv, stride_od, HEAD_DV)
    lse2 = tl.load(lse_base + rows * stride_lm, mask=row_ok, other=float("inf")) * score_unit(MASK_KIND)
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # nothing visible: P = exp2(-inf) = 0
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _query_axis(x, KEYS_AS_ROWS: tl.constexpr):
    """A vector over the step's query rows, shaped to broadcast along its tile's query axis."""
    if KEYS_AS_ROWS:
        return x[None, :]
    return x[:, None]


@triton.jit
def _key_axis(x, KEYS_AS_ROWS: tl.constexpr):
    """A vector over the program's keys, shaped to broadcast along the tile's key axis."""
    if KEYS_AS_ROWS:
        return x[:, None]
    return x[None, :]


@triton.jit
def _tile_product(query_side, key_side, DOT_PRECISION: tl.constexpr, KEYS_AS_ROWS: tl.constexpr):
    """query_side (queries x d) against key_side (keys x d) as the step's tile: queries x keys, or keys x queries."""
    if KEYS_AS_ROWS:
        return dot(key_side, tl.trans(query_side), DOT_PRECISION)
    return dot(query_side, tl.trans(key_side), DOT_PRECISION)


@triton.jit
def _keys_first(tile, KEYS_AS_ROWS: tl.constexpr):
    """The step's tile as keys x queries, the left operand of the dV and dK products."""
    if KEYS_AS_ROWS:
        return tile
    return tl.trans(tile)


@triton.jit
def _kv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, start_m, cols, diag, seqlen_q,
             seqlen_k, scale, softcap, slope2, left, right, hhash, threshold, keep_scale,
             stride_qm, stride_qd, stride_om, stride_od, stride_lm, stride_mm,
             offs_dk, offs_dv, HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr,
             CHECKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
             SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
             DOT_PRECISION: tl.constexpr, KEYS_AS_ROWS: tl.constexpr):
    """One query block's share of dK/dV. KEYS_AS_ROWS computes the tile as keys x queries (K Q^T, V dO^T), as
    FlexAttention's backward does: P^T and dS^T then enter the dV and dK products as they come out of the
    first products, where the other orientation transposes both (a layout conversion each); mask_base holds the
    key columns in the tile's orientation (cols[:, None] or cols[None, :])."""
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q
    q, do, lse2, delta = _query_rows(q_base, do_base, lse_base, delta_base, rows, row_ok, stride_qm, stride_qd,
                                     stride_om, stride_od, stride_lm, offs_dk, offs_dv, HEAD_DQK, HEAD_DV,
                                     MASK_KIND)
    r = _query_axis(rows, KEYS_AS_ROWS)
    c = _key_axis(cols, KEYS_AS_ROWS)
    mask_ptrs = mask_base + _query_axis(tl.minimum(rows, seqlen_q - 1).to(tl.int64), KEYS_AS_ROWS) * stride_mm
    s, capped = transform_scores(_tile_product(q, k, DOT_PRECISION, KEYS_AS_ROWS), r, c, diag, scale, softcap,
                                 slope2, mask_ptrs, c < seqlen_k, SOFTCAP, ALIBI, MASK_KIND)
    if CHECKED:
        s = visible(s, r, c, diag, left, right, seqlen_k, HAS_LEFT, HAS_RIGHT)
    p = tl.exp2((s - _query_axis(lse2, KEYS_AS_ROWS)) * (1.4426950408889634 / score_unit(MASK_KIND)))
    dp = _tile_product(do, v, DOT_PRECISION, KEYS_AS_ROWS)
    if DROPOUT:
        keep = keep_tile(hhash, r, c, threshold)
        p_dropped = tl.where(keep, p * keep_scale, 0.0)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    else:
        p_dropped = p
    # dV before dS, as the step always ran (the GPU's tests and race checks were of this order)
    dv += dot(_keys_first(operand(p_dropped, do, DOT_PRECISION), KEYS_AS_ROWS), do, DOT_PRECISION)
    ds = p * (dp - _query_axis(delta, KEYS_AS_ROWS))
    if SOFTCAP:
        ds = ds * (1.0 - capped * capped)
    dk += dot(_keys_first(operand(ds, q, DOT_PRECISION), KEYS_AS_ROWS), q, DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "left", "right", "seed", "threshold", "stride_lb", "stride_lh", "stride_deltab", "stride_deltah"])
def attention_backward_kv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, MASK, ALIBI_SLOPES, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd, stride_ob, stride_om, stride_oh, stride_od,
    stride_lb, stride_lh, stride_lm, stride_deltab, stride_deltah, stride_mb, stride_mh, stride_mm, stride_mn, stride_ab, stride_ah,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    seqlen_q, seqlen_k, heads_q, heads_kv, group, scale, softcap, left, right, seed, threshold, keep_scale,
    HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, KEYS_AS_ROWS: tl.constexpr = False,
):
    n_block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads_kv
    kv_head = bh % heads_kv
    start_q, start_k, seqlen_q, seqlen_k = sequence_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    n0 = n_block * BLOCK_N
    if n0 >= seqlen_k:
        return
    diag = seqlen_k - seqlen_q
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < seqlen_k
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_base = K + b.to(tl.int64) * stride_kb + start_k.to(tl.int64) * stride_kn + kv_head * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + start_k.to(tl.int64) * stride_vn + kv_head * stride_vh
    k = load_rows(k_base, cols, col_ok, stride_kn, offs_dk, stride_kd, HEAD_DQK)
    v = load_rows(v_base, cols, col_ok, stride_vn, offs_dv, stride_vd, HEAD_DV)

    # Query rows that can see any key of this block, and those that see all of it.
    lo = 0
    hi = seqlen_q
    full_lo = 0
    full_hi = seqlen_q
    if HAS_RIGHT:
        lo = tl.maximum(n0 - diag - right, 0) // BLOCK_M * BLOCK_M
        full_lo = n0 + BLOCK_N - 1 - diag - right
    if HAS_LEFT:
        hi = tl.minimum(seqlen_q, n0 + BLOCK_N - diag + left)
        full_hi = tl.minimum(seqlen_q, n0 - diag + left + 1)
    if n0 + BLOCK_N > seqlen_k:  # the key tail needs checks on every query block
        full_hi = full_lo - BLOCK_M
    mid_lo, mid_hi = split_range(lo, hi, full_lo, full_hi, BLOCK_M)

    dk = tl.full([BLOCK_N, BLOCK_DQK], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, dtype=tl.float32)
    for g in range(0, group):
        h = kv_head * group + g
        q_base = Q + b.to(tl.int64) * stride_qb + start_q.to(tl.int64) * stride_qm + h * stride_qh
        do_base = DO + b.to(tl.int64) * stride_ob + start_q.to(tl.int64) * stride_om + h * stride_oh
        lse_base = LSE + b.to(tl.int64) * stride_lb + start_q.to(tl.int64) * stride_lm + h * stride_lh
        delta_base = DELTA + b.to(tl.int64) * stride_deltab + h * stride_deltah + start_q
        mask_base = MASK + b.to(tl.int64) * stride_mb + h * stride_mh + _key_axis(cols, KEYS_AS_ROWS) * stride_mn
        slope2 = 0.0
        if ALIBI:
            slope2 = tl.load(ALIBI_SLOPES + b * stride_ab + h * stride_ah).to(tl.float32) * score_unit(MASK_KIND)
        hhash = seed
        if DROPOUT:
            hhash = head_hash(seed, b * heads_q + h)
        for start_m in range(lo, mid_lo, BLOCK_M):
            dk, dv = _kv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, start_m, cols, diag,
                              seqlen_q, seqlen_k, scale, softcap, slope2, left, right, hhash, threshold,
                              keep_scale, stride_qm, stride_qd, stride_om, stride_od, stride_lm, stride_mm,
                              offs_dk, offs_dv, HEAD_DQK, HEAD_DV, BLOCK_M, True, HAS_LEFT, HAS_RIGHT,
                              SOFTCAP, ALIBI, MASK_KIND, DROPOUT, DOT_PRECISION, KEYS_AS_ROWS)
        for start_m in range(mid_lo, mid_hi, BLOCK_M):
            dk, dv = _kv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, start_m, cols, diag,
                              seqlen_q, seqlen_k, scale, softcap, slope2, left, right, hhash, threshold,
                              keep_scale, stride_qm, stride_qd, stride_om, stride_od, stride_lm, stride_mm,
                              offs_dk, offs_dv, HEAD_DQK, HEAD_DV, BLOCK_M, False, HAS_LEFT, HAS_RIGHT,
                              SOFTCAP, ALIBI, MASK_KIND, DROPOUT, DOT_PRECISION, KEYS_AS_ROWS)
        for start_m in range(mid_hi, hi, BLOCK_M):
            dk, dv = _kv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, start_m, cols, diag,
                              seqlen_q, seqlen_k, scale, softcap, slope2, left, right, hhash, threshold,
                              keep_scale, stride_qm, stride_qd, stride_om, stride_od, stride_lm, stride_mm,
                              offs_dk, offs_dv, HEAD_DQK, HEAD_DV, BLOCK_M, True, HAS_LEFT, HAS_RIGHT,
                              SOFTCAP, ALIBI, MASK_KIND, DROPOUT, DOT_PRECISION, KEYS_AS_ROWS)

    dk = dk * scale
    dk_base = DK + b.to(tl.int64) * stride_dkb + start_k.to(tl.int64) * stride_dkn + kv_head * stride_dkh
    dv_base = DV + b.to(tl.int64) * stride_dvb + start_k.to(tl.int64) * stride_dvn + kv_head * stride_dvh
    tl.store(dk_base + cols[:, None] * stride_dkn + offs_dk[None, :], stored(dk, DK.dtype.element_ty, DOT_PRECISION),
             mask=col_ok[:, None] & (offs_dk[None, :] < HEAD_DQK))
    tl.store(dv_base + cols[:, None] * stride_dvn + offs_dv[None, :], stored(dv, DV.dtype.element_ty, DOT_PRECISION),
             mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DV))


@triton.jit
def _q_step(dq, q, do, lse2, delta, k_base, v_base, mask_base, ds_base, start_n, rows, row_ok, diag, seqlen_k,
            scale, softcap, slope2, left, right, hhash, threshold, keep_scale, stride_kn, stride_kd, stride_vn,
            stride_vd, stride_mn, offs_dk, offs_dv, HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr,
            BLOCK_N: tl.constexpr, CHECKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
            SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
            WRITE_DS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < seqlen_k
    k = load_rows(k_base, cols, col_ok, stride_kn, offs_dk, stride_kd, HEAD_DQK)
    v = load_rows(v_base, cols, col_ok, stride_vn, offs_dv, stride_vd, HEAD_DV)
    qk = dot(q, tl.trans(k), DOT_PRECISION)
    s, capped = transform_scores(qk, rows[:, None], cols[None, :], diag, scale, softcap, slope2,
                                 mask_base + cols[None, :] * stride_mn, col_ok[None, :], SOFTCAP, ALIBI, MASK_KIND)
    if CHECKED:
        s = visible(s, rows[:, None], cols[None, :], diag, left, right, seqlen_k, HAS_LEFT, HAS_RIGHT)
    p = tl.exp2((s - lse2[:, None]) * (1.4426950408889634 / score_unit(MASK_KIND)))
    dp = dot(do, tl.trans(v), DOT_PRECISION)
    if DROPOUT:
        keep = keep_tile(hhash, rows[:, None], cols[None, :], threshold)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if WRITE_DS:  # d(additive mask) = dS before the softcap chain rule (the mask is added after it)
        tl.store(ds_base + cols[None, :], ds, mask=row_ok[:, None] & col_ok[None, :])
    if SOFTCAP:
        ds = ds * (1.0 - capped * capped)
    dq += dot(operand(ds, k, DOT_PRECISION), k, DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "left", "right", "seed", "threshold", "stride_lb", "stride_lh", "stride_deltab", "stride_deltah"])
def attention_backward_q_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DS, MASK, ALIBI_SLOPES, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd, stride_ob, stride_om, stride_oh, stride_od,
    stride_lb, stride_lh, stride_lm, stride_deltab, stride_deltah, stride_mb, stride_mh, stride_mm, stride_mn, stride_ab, stride_ah,
    stride_dqb, stride_dqm, stride_dqh,
    seqlen_q, seqlen_k, heads_q, group, scale, softcap, left, right, seed, threshold, keep_scale,
    HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr, WRITE_DS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads_q
    h = bh % heads_q
    start_q, start_k, seqlen_q, seqlen_k = sequence_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    m0 = m_block * BLOCK_M
    if m0 >= seqlen_q:
        return
    diag = seqlen_k - seqlen_q
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_base = Q + b.to(tl.int64) * stride_qb + start_q.to(tl.int64) * stride_qm + h * stride_qh
    do_base = DO + b.to(tl.int64) * stride_ob + start_q.to(tl.int64) * stride_om + h * stride_oh
    lse_base = LSE + b.to(tl.int64) * stride_lb + start_q.to(tl.int64) * stride_lm + h * stride_lh
    delta_base = DELTA + b.to(tl.int64) * stride_deltab + h * stride_deltah + start_q
    q, do, lse2, delta = _query_rows(q_base, do_base, lse_base, delta_base, rows, row_ok, stride_qm, stride_qd,
                                     stride_om, stride_od, stride_lm, offs_dk, offs_dv, HEAD_DQK, HEAD_DV,
                                     MASK_KIND)
    kv_head = h // group
    k_base = K + b.to(tl.int64) * stride_kb + start_k.to(tl.int64) * stride_kn + kv_head * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + start_k.to(tl.int64) * stride_vn + kv_head * stride_vh
    mask_rows = tl.minimum(rows, seqlen_q - 1).to(tl.int64)
    mask_base = MASK + b.to(tl.int64) * stride_mb + h * stride_mh + mask_rows[:, None] * stride_mm
    # DS is a contiguous (B, Hq, Lq, Lk) float32 buffer (dense problems only).
    ds_base = DS + ((b.to(tl.int64) * heads_q + h) * seqlen_q + rows[:, None]) * seqlen_k
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(ALIBI_SLOPES + b * stride_ab + h * stride_ah).to(tl.float32) * score_unit(MASK_KIND)
    hhash = seed
    if DROPOUT:
        hhash = head_hash(seed, bh)

    lo, hi, mid_lo, mid_hi = query_block_band(m0, diag, left, right, seqlen_k, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)

    dq = tl.full([BLOCK_M, BLOCK_DQK], 0.0, dtype=tl.float32)
    for start_n in range(lo, mid_lo, BLOCK_N):
        dq = _q_step(dq, q, do, lse2, delta, k_base, v_base, mask_base, ds_base, start_n, rows, row_ok, diag,
                     seqlen_k, scale, softcap, slope2, left, right, hhash, threshold, keep_scale, stride_kn,
                     stride_kd, stride_vn, stride_vd, stride_mn, offs_dk, offs_dv, HEAD_DQK, HEAD_DV, BLOCK_N,
                     True, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, DROPOUT, WRITE_DS, DOT_PRECISION)
    for start_n in range(mid_lo, mid_hi, BLOCK_N):
        dq = _q_step(dq, q, do, lse2, delta, k_base, v_base, mask_base, ds_base, start_n, rows, row_ok, diag,
                     seqlen_k, scale, softcap, slope2, left, right, hhash, threshold, keep_scale, stride_kn,
                     stride_kd, stride_vn, stride_vd, stride_mn, offs_dk, offs_dv, HEAD_DQK, HEAD_DV, BLOCK_N,
                     False, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, DROPOUT, WRITE_DS, DOT_PRECISION)
    for start_n in range(mid_hi, hi, BLOCK_N):
        dq = _q_step(dq, q, do, lse2, delta, k_base, v_base, mask_base, ds_base, start_n, rows, row_ok, diag,
                     seqlen_k, scale, softcap, slope2, left, right, hhash, threshold, keep_scale, stride_kn,
                     stride_kd, stride_vn, stride_vd, stride_mn, offs_dk, offs_dv, HEAD_DQK, HEAD_DV, BLOCK_N,
                     True, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, DROPOUT, WRITE_DS, DOT_PRECISION)
    dq = dq * scale
    dq_base = DQ + b.to(tl.int64) * stride_dqb + start_q.to(tl.int64) * stride_dqm + h * stride_dqh
    tl.store(dq_base + rows[:, None] * stride_dqm + offs_dk[None, :], stored(dq, DQ.dtype.element_ty, DOT_PRECISION),
             mask=row_ok[:, None] & (offs_dk[None, :] < HEAD_DQK))


@triton.jit(do_not_specialize=["rows"])
def attention_backward_delta_kernel(
        O, DO, DLSE, DELTA,
        stride_ob, stride_om, stride_oh, stride_od, stride_gb, stride_gm, stride_gh, stride_gd,
        stride_lb, stride_lh, stride_lm, rows, heads,
        HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr, HAS_DLSE: tl.constexpr):
    """delta = rowsum(dO * O) - dLSE in float32, one program per (row block, batch * head): O and dO are read once
    in their own dtype (torch ops took ~7x the bytes: float32 copies of both, their product, then the sum), delta
    is written contiguous (B, H, rows) as the kernels above read it."""
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_DV)
    row_ok = r < rows
    ok = row_ok[:, None] & (d[None, :] < HEAD_DV)
    r64 = r.to(tl.int64)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h * stride_oh + r64[:, None] * stride_om + d[None, :] * stride_od,
                mask=ok, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_gb + h * stride_gh + r64[:, None] * stride_gm + d[None, :] * stride_gd,
                 mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + b.to(tl.int64) * stride_lb + h * stride_lh + r64 * stride_lm, mask=row_ok,
                         other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * rows + r, delta, mask=row_ok)
