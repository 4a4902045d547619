"""Forward kernel: one program per (query block, batch * query head), online softmax over key blocks.

Key blocks outside the causal/window band are never visited; blocks fully inside it run without
per-element checks (split_range). GQA reads KV head h // group directly (no repeat). Varlen: the
batch index selects cu_seqlens offsets; programs past a sequence's end return at once.
"""

import triton
import triton.language as tl

from .common import (dot, head_hash, keep_tile, load_rows, operand, query_block_band, score_unit, sequence_bounds,
                     stored, transform_scores, visible)


@triton.jit
def _step(acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, rows, diag, seqlen_k, scale, softcap, slope2,
          left, right, hhash, threshold, keep_scale, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
          offs_dk, offs_dv, HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr,
          CHECKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
          ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
          TMA: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < seqlen_k
    if TMA:  # k_base / v_base are this sequence's descriptors: rows past seqlen_k and columns past the dim read 0
        k = k_base.load([start_n, 0]).T
        v = v_base.load([start_n, 0])
    else:
        k_ptrs = k_base + cols[None, :] * stride_kn + offs_dk[:, None] * stride_kd
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd
        if CHECKED:
            k = tl.load(k_ptrs, mask=col_ok[None, :] & (offs_dk[:, None] < HEAD_DQK), other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
        else:
            k = tl.load(k_ptrs, mask=offs_dk[:, None] < HEAD_DQK, other=0.0)
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DV, other=0.0)
    qk = dot(q, k, DOT_PRECISION)
    mask_ptrs = mask_base + cols[None, :] * stride_mn
    s, _ = transform_scores(qk, rows[:, None], cols[None, :], diag, scale, softcap, slope2, mask_ptrs,
                            col_ok[None, :], SOFTCAP, ALIBI, MASK_KIND)
    if CHECKED:
        s = visible(s, rows[:, None], cols[None, :], diag, left, right, seqlen_k, HAS_LEFT, HAS_RIGHT)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet stay NaN-free
    to_log2 = 1.4426950408889634 / score_unit(MASK_KIND)
    alpha = tl.exp2((m_i - m_safe) * to_log2)
    p = tl.exp2((s - m_safe[:, None]) * to_log2)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(keep_tile(hhash, rows[:, None], cols[None, :], threshold), p * keep_scale, 0.0)
    acc = acc * alpha[:, None] + dot(operand(p, v, DOT_PRECISION), v, DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "left", "right", "seed", "threshold", "stride_lb", "stride_lh"])
def attention_forward_kernel(
    Q, K, V, O, LSE, MASK, ALIBI_SLOPES, SINKS, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd, stride_ob, stride_om, stride_oh, stride_od,
    stride_lb, stride_lh, stride_lm, stride_mb, stride_mh, stride_mm, stride_mn, stride_ab, stride_ah,
    seqlen_q, seqlen_k, heads_q, group, scale, softcap, left, right, seed, threshold, keep_scale,
    HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, SINKS_ON: tl.constexpr, MASK_KIND: tl.constexpr,
    VARLEN: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr = False,
):
    # Heaviest (last, for causal) query blocks first: they start early and the tail is short ones.
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
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < seqlen_q

    q_base = Q + b.to(tl.int64) * stride_qb + start_q.to(tl.int64) * stride_qm + h * stride_qh
    q = load_rows(q_base, rows, row_ok, stride_qm, offs_dk, stride_qd, HEAD_DQK)
    kv_head = h // group
    k_base = K + b.to(tl.int64) * stride_kb + start_k.to(tl.int64) * stride_kn + kv_head * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + start_k.to(tl.int64) * stride_vn + kv_head * stride_vh
    if TMA:  # Hopper's tensor memory accelerator streams the K/V tiles (the launcher checked the alignment)
        k_base = tl.make_tensor_descriptor(k_base, shape=[seqlen_k, HEAD_DQK], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, BLOCK_DQK])
        v_base = tl.make_tensor_descriptor(v_base, shape=[seqlen_k, HEAD_DV], strides=[stride_vn, 1],
                                           block_shape=[BLOCK_N, BLOCK_DV])
    # Rows past the end read the last row's mask (their results are never stored).
    mask_rows = tl.minimum(rows, seqlen_q - 1).to(tl.int64)
    mask_base = MASK + b.to(tl.int64) * stride_mb + h * stride_mh + mask_rows[:, None] * stride_mm
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(ALIBI_SLOPES + b * stride_ab + h * stride_ah).to(tl.float32) * score_unit(MASK_KIND)
    hhash = seed
    if DROPOUT:
        hhash = head_hash(seed, bh)

    # The band of keys any row of this block can see, and the part every row sees entirely.
    lo, hi, mid_lo, mid_hi = query_block_band(m0, diag, left, right, seqlen_k, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)

    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start_n in range(lo, mid_lo, BLOCK_N):
        acc, l_i, m_i = _step(acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, rows, diag, seqlen_k,
                              scale, softcap, slope2, left, right, hhash, threshold, keep_scale,
                              stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, offs_dk, offs_dv,
                              HEAD_DQK, HEAD_DV, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI,
                              MASK_KIND, DROPOUT, DOT_PRECISION, TMA)
    for start_n in range(mid_lo, mid_hi, BLOCK_N):
        acc, l_i, m_i = _step(acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, rows, diag, seqlen_k,
                              scale, softcap, slope2, left, right, hhash, threshold, keep_scale,
                              stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, offs_dk, offs_dv,
                              HEAD_DQK, HEAD_DV, BLOCK_N, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI,
                              MASK_KIND, DROPOUT, DOT_PRECISION, TMA)
    for start_n in range(mid_hi, hi, BLOCK_N):
        acc, l_i, m_i = _step(acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, rows, diag, seqlen_k,
                              scale, softcap, slope2, left, right, hhash, threshold, keep_scale,
                              stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, offs_dk, offs_dv,
                              HEAD_DQK, HEAD_DV, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI,
                              MASK_KIND, DROPOUT, DOT_PRECISION, TMA)

    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    unit = score_unit(MASK_KIND)
    if SINKS_ON:  # the sink joins the denominator only: rescale to the larger max, add its weight
        sink2 = tl.load(SINKS + h).to(tl.float32) * unit
        m_new = tl.maximum(m_i, sink2)
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_safe - m_new_safe) * (1.4426950408889634 / unit))
        alpha = tl.where(m_i == float("-inf"), 0.0, alpha)
        l_i = l_i * alpha + tl.exp2((sink2 - m_new_safe) * (1.4426950408889634 / unit))
        acc = acc * alpha[:, None]
        m_safe = m_new_safe
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_safe / unit + tl.log2(l_safe) * 0.6931471805599453)

    o_base = O + b.to(tl.int64) * stride_ob + start_q.to(tl.int64) * stride_om + h * stride_oh
    tl.store(o_base + rows[:, None] * stride_om + offs_dv[None, :] * stride_od, stored(out, O.dtype.element_ty, DOT_PRECISION),
             mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV))
    lse_base = LSE + b.to(tl.int64) * stride_lb + start_q.to(tl.int64) * stride_lm + h * stride_lh
    tl.store(lse_base + rows * stride_lm, lse, mask=row_ok)
