"""Split-K decode over a (possibly quantized) KV cache: partial outputs + LSE, then a merge kernel.

decode_split_kernel: one program per (split, batch x KV head, query tile). Its rows are every query
head of the KV head's group times the tile's query rows (row r = query i * G + head g), so each
K/V element of the split is read, and dequantized, once for the whole group. The visible key range
of the tile ([start, end) from seqlens_k[b], causal/window bottom-right) is computed in the kernel
and cut into `num_splits` equal parts, so ragged lengths need no host read and no length is a
compile-time constant. Codes are dequantized in registers:

    fp8_e4m3  byte << 7 (sign << 15) is a float16 whose value is e4m3's / 256 (exact, subnormals too)
    fp8_e5m2  byte << 8 is exactly the float16 of the same value
    int8      int8 -> float
    nf4       16-level table gathered by nibble; low nibble = element 2i, high = 2i + 1: the dot
              products run on even and odd columns separately (no interleave)

Scales: one per (token, head) or per head (SCALE_MODE 1) multiply the scores after the QK dot
(keys) or the probabilities before the PV dot (values): codes enter the dot exactly. Per-channel
scales of int8/fp8 (SCALE_MODE 2) are applied element-wise before the dot. nf4's scales per group
of D (SCALE_MODE 3) multiply each group's float32 partial scores (keys: one masked full-width dot
per group) or the probabilities before each group's dot (values).

A bfloat16 q whose key dot runs in float16 (quantized keys) is brought into float16's range by a
power of two per tile first (_fit_half); the scores take it back.

decode_merge_kernel: one program per (batch, query head, query row) combines the splits' LSEs
(base 2) and normalized partial outputs; sinks join the denominator there. With one split the
split kernel writes the final output itself (DIRECT).
"""

import triton
import triton.language as tl

from mfa_hf.kv_formats import spec

from .common import dot, softcap_tanh

# The kernel ids of mfa_hf/kv_formats.py, as the constexprs K_FMT / V_FMT are compared with.
FMT_NONE = tl.constexpr(spec("none").kernel_id)
FMT_E4M3 = tl.constexpr(spec("fp8_e4m3").kernel_id)
FMT_E5M2 = tl.constexpr(spec("fp8_e5m2").kernel_id)
FMT_INT8 = tl.constexpr(spec("int8").kernel_id)
FMT_NF4 = tl.constexpr(spec("nf4").kernel_id)


# ---- ASM conversions (GPU, sm_89+): packed, 4 codes in one 32-bit register, 4 float16 out -------
# fp8: the hardware's packed conversion (2 codes per instruction).
_FP8_ASM = """{
.reg .b16 lo, hi;
mov.b32 {lo, hi}, $2;
cvt.rn.f16x2.%s $0, lo;
cvt.rn.f16x2.%s $1, hi;
}"""
E4M3_ASM = tl.constexpr(_FP8_ASM % ("e4m3x2", "e4m3x2"))
E5M2_ASM = tl.constexpr(_FP8_ASM % ("e5m2x2", "e5m2x2"))
# int8: (c ^ 0x80) = c + 128 as the low byte of float16 0x64XX = 1024 + c + 128, minus 1152 (exact).
INT8_ASM = tl.constexpr("""{
.reg .b32 t, m, k;
xor.b32 t, $2, 0x80808080;
mov.b32 m, 0x64646464;
prmt.b32 $0, t, m, 0x4140;
prmt.b32 $1, t, m, 0x4342;
mov.b32 k, 0x64806480;
sub.f16x2 $0, $0, k;
sub.f16x2 $1, $1, k;
}""")


def _nf4_asm(high: bool) -> str:
    """nf4 nibble -> float16 level by byte permutes on a 16-entry table held in registers.

    The 4 nibbles (low or high one of each byte) become the 4 selectors of one prmt; entries 0-7 and
    8-15 are looked up separately (prmt selects among 8 bytes), for the low and the high byte of the
    float16 level, then bit 3 of each nibble picks between them and the bytes are interleaved.
    """
    import struct

    bits = [struct.unpack("<H", struct.pack("<e", v))[0] for v in spec("nf4").codebook]
    lo = [b & 0xFF for b in bits]
    hi = [b >> 8 for b in bits]

    def word(t, k):
        return "0x%08x" % (t[4 * k] | t[4 * k + 1] << 8 | t[4 * k + 2] << 16 | t[4 * k + 3] << 24)

    first = "shr.b32 x, $2, 4;\nand.b32 x, x, 0x0F0F0F0F;" if high else "and.b32 x, $2, 0x0F0F0F0F;"
    return "\n".join([
        "{",
        ".reg .b32 x, s, s7, sel, a, b, c, d, l, h, t0, t1, t2, t3, u0, u1, u2, u3;",
        first,
        "shr.b32 s, x, 4;",
        "or.b32 x, x, s;",  # byte 0 = n0 | n1 << 4, byte 2 = n2 | n3 << 4
        "prmt.b32 s, x, 0, 0x0020;",  # low 16 bits: n0 | n1 << 4 | n2 << 8 | n3 << 12
        "and.b32 s7, s, 0x7777;",
        *(f"mov.b32 t{k}, {word(lo, k)};" for k in range(4)),
        *(f"mov.b32 u{k}, {word(hi, k)};" for k in range(4)),
        "prmt.b32 a, t0, t1, s7;",
        "prmt.b32 b, t2, t3, s7;",
        "prmt.b32 c, u0, u1, s7;",
        "prmt.b32 d, u2, u3, s7;",
        "shr.b32 sel, s, 1;",
        "and.b32 sel, sel, 0x4444;",
        "or.b32 sel, sel, 0x3210;",  # selector i: byte i of a/c (entry < 8) or of b/d (entry >= 8)
        "prmt.b32 l, a, b, sel;",
        "prmt.b32 h, c, d, sel;",
        "prmt.b32 $0, l, h, 0x5140;",
        "prmt.b32 $1, l, h, 0x7362;",
        "}",
    ])


NF4_LO_ASM = tl.constexpr(_nf4_asm(False))
NF4_HI_ASM = tl.constexpr(_nf4_asm(True))


@triton.jit
def _asm_f16(raw, ASM_STR: tl.constexpr):
    return tl.inline_asm_elementwise(ASM_STR, "=r,=r,r", [raw], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _nibble_values(raw, LEVELS, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """nf4 bytes (one load) -> (low nibbles' levels, high nibbles' levels) in DTYPE."""
    return _values(raw, FMT_NF4, 0, LEVELS, DTYPE, ASM), _values(raw, FMT_NF4, 1, LEVELS, DTYPE, ASM)


@triton.jit
def _mm(a, b, DOT_PRECISION: tl.constexpr, KEYS_AS_ROWS: tl.constexpr):
    """a @ b; KEYS_AS_ROWS computes it as (b^T @ a^T)^T, so the key tile (the larger one: BLOCK_N keys against the
    BLOCK_M = G x query rows, often 16 rows padded for 4) is the MMA's M side, and q / p the narrow N side."""
    if KEYS_AS_ROWS:
        return tl.trans(dot(tl.trans(b), tl.trans(a), DOT_PRECISION))
    return dot(a, b, DOT_PRECISION)


@triton.jit
def _values(raw, FMT: tl.constexpr, NIBBLE: tl.constexpr, LEVELS, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """Codes -> values in DTYPE, before scales (e4m3 comes out / 256: K_CONST/V_CONST undo it).

    Everything goes through float16 bit patterns built with integer operations (no conversion
    instruction, a quarter-rate unit on Hopper, per element); the dots then run in float16.
    """
    if FMT == FMT_NONE:
        return raw.to(DTYPE)
    elif ASM:  # packed conversions (fp8 values are exact, not / 256: the launcher sets K_CONST 1)
        if FMT == FMT_E4M3:
            return _asm_f16(raw, E4M3_ASM).to(DTYPE)
        elif FMT == FMT_E5M2:
            return _asm_f16(raw, E5M2_ASM).to(DTYPE)
        elif FMT == FMT_INT8:
            return _asm_f16(raw, INT8_ASM).to(DTYPE)
        elif NIBBLE == 0:
            return _asm_f16(raw, NF4_LO_ASM).to(DTYPE)
        else:
            return _asm_f16(raw, NF4_HI_ASM).to(DTYPE)
    elif FMT == FMT_E4M3:
        c = raw.to(tl.int16) & 0xFF
        return (((c & 0x80) << 8) | ((c & 0x7F) << 7)).to(tl.float16, bitcast=True).to(DTYPE)
    elif FMT == FMT_E5M2:
        c = raw.to(tl.int16) & 0xFF
        return (c << 8).to(tl.float16, bitcast=True).to(DTYPE)
    elif FMT == FMT_INT8:
        return raw.to(DTYPE)  # int8 -> the dot's type (a float16 bit-pattern trick measured slower)
    else:
        idx = (raw.to(tl.int32) >> (4 * NIBBLE)) & 0xF
        return tl.load(LEVELS + idx).to(DTYPE)


@triton.jit
def _load_codes(base, cols, dcols, col_ok, stride_n, stride_d, HEAD_D: tl.constexpr, FMT: tl.constexpr,
                TRANSPOSED: tl.constexpr):
    """One K (TRANSPOSED: (D, N)) or V ((N, D)) tile as stored: values of a plain cache, codes of a quantized
    one (nf4: bytes, dcols indexing bytes; both nibbles come from this one load)."""
    if TRANSPOSED:
        ptrs = base + cols[None, :] * stride_n + dcols[:, None] * stride_d
        ok = col_ok[None, :] & (dcols[:, None] < HEAD_D)
    else:
        ptrs = base + cols[:, None] * stride_n + dcols[None, :] * stride_d
        ok = col_ok[:, None] & (dcols[None, :] < HEAD_D)
    if FMT == FMT_NONE:
        return tl.load(ptrs, mask=ok, other=0.0)
    return tl.load(ptrs, mask=ok, other=0)


@triton.jit
def _side_values(raw, scale_base, cols, dcols, col_ok, stride_sn, stride_sg,
                 HEAD_D: tl.constexpr, FMT: tl.constexpr, SCALE_MODE: tl.constexpr, GS: tl.constexpr,
                 LEVELS, TRANSPOSED: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """A tile from _load_codes as values in DTYPE. SCALE_MODE 2 (a scale per group of GS along D, not nf4)
    applies the scales element-wise here; modes 1 and 3 are applied by the caller around the dots. Not for nf4
    (_nibble_values)."""
    if FMT == FMT_NONE:
        return raw.to(DTYPE)
    vals = _values(raw, FMT, 0, LEVELS, DTYPE, ASM)
    if SCALE_MODE == 2:
        if TRANSPOSED:
            sptrs = scale_base + cols[None, :] * stride_sn + (dcols[:, None] // GS) * stride_sg
            ok = col_ok[None, :] & (dcols[:, None] < HEAD_D)
        else:
            sptrs = scale_base + cols[:, None] * stride_sn + (dcols[None, :] // GS) * stride_sg
            ok = col_ok[:, None] & (dcols[None, :] < HEAD_D)
        vals = (vals.to(tl.float32) * tl.load(sptrs, mask=ok, other=0.0)).to(DTYPE)
    return vals


@triton.jit
def _fit_half(q_lo, q_hi):
    """(q_lo, q_hi) float32 with every |q| of the tile below 2^15, float16's range, and the power of two they were
    divided by: 2^e, e = max(0, E - 14) for E the exponent of the tile's largest |q|. 1 for a tile below 2^15
    (q as it came), else exact but for elements under 2^(e - 16), far below the tile's largest, which lose bits as
    float16 subnormals. One factor for the tile, a scalar in the key loop; still, nf4 ran 2-5% slower with it on an
    H100 (as with a factor a row; kernels/triton/README.md). inf or NaN stays non-finite."""
    big = tl.maximum(tl.max(tl.max(tl.abs(q_lo.to(tl.float32)), 1), 0),
                     tl.max(tl.max(tl.abs(q_hi.to(tl.float32)), 1), 0))
    exponent = ((big.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    shift = tl.maximum(exponent - 14, 0)
    down = ((127 - shift) << 23).to(tl.float32, bitcast=True)  # 2^-shift; shift <= 114 keeps it normal
    up = ((127 + shift) << 23).to(tl.float32, bitcast=True)
    return q_lo.to(tl.float32) * down, q_hi.to(tl.float32) * down, up


@triton.jit(do_not_specialize=["seqlen_q", "group", "num_splits", "left", "right", "cache_rows", "capacity"])
def decode_split_kernel(
    Q, K, V, KS, VS, SEQLENS, BATCH_IDX, SLOPES, SINKS, LEVELS, O, LSE, PART_O, PART_LSE,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd, stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ksb, stride_ksn, stride_ksh, stride_ksg, stride_vsb, stride_vsn, stride_vsh, stride_vsg,
    stride_ob, stride_om, stride_oh, stride_lb, stride_lh, stride_ab, stride_ah,
    seqlen_q, heads_kv, group, num_splits, left, right, qk_scale, softcap, cache_rows, capacity,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    K_FMT: tl.constexpr, V_FMT: tl.constexpr, K_SCALE: tl.constexpr, V_SCALE: tl.constexpr,
    K_CONST: tl.constexpr, V_CONST: tl.constexpr, V_OUT: tl.constexpr, K_GS: tl.constexpr, V_GS: tl.constexpr,
    K_NG: tl.constexpr, V_NG: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    SINKS_ON: tl.constexpr, DIRECT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ASM: tl.constexpr = False, KEYS_AS_ROWS: tl.constexpr = False,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    q_tile = tl.program_id(2)
    b = bh // heads_kv
    kvh = bh % heads_kv
    row_b = b.to(tl.int64)  # batch offsets in 64 bits: a whole cache may pass 2**31 elements
    # The host trusts cache_batch_idx and cache_seqlens (nothing is read back, as in FlashAttention-2):
    # clamped into the cache here, a bad value gives undefined results, never an out-of-bounds read.
    if HAS_BATCH_IDX:
        row_b = tl.minimum(tl.maximum(tl.load(BATCH_IDX + b).to(tl.int64), 0), cache_rows - 1)
    seqlen_k = tl.minimum(tl.maximum(tl.load(SEQLENS + b).to(tl.int32), 0), capacity)
    diag = seqlen_k - seqlen_q  # query i sits on key i + diag

    r = tl.arange(0, BLOCK_M)
    qi = q_tile * BLOCK_Q + r // group
    head = kvh * group + r % group
    row_ok = (r < BLOCK_Q * group) & (qi < seqlen_q)

    # Keys some row of this tile can see, then this split's share.
    i0 = q_tile * BLOCK_Q
    i1 = tl.minimum(seqlen_q, i0 + BLOCK_Q)
    start = 0
    if HAS_LEFT:
        start = tl.maximum(0, i0 + diag - left)
    end = seqlen_k
    if HAS_RIGHT:
        end = tl.minimum(seqlen_k, i1 - 1 + diag + right + 1)
    end = tl.maximum(start, end)
    per_split = (end - start + num_splits - 1) // num_splits
    per_split = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(end, lo + per_split)

    HALF_K: tl.constexpr = K_FMT == FMT_NF4
    HALF_V: tl.constexpr = V_FMT == FMT_NF4
    q_base = Q + b.to(tl.int64) * stride_qb + qi[:, None] * stride_qm + head[:, None] * stride_qh
    dq = tl.arange(0, BLOCK_D)
    if HALF_K:  # even and odd columns of q meet the low and high nibbles
        q_lo = tl.load(q_base + (2 * dq)[None, :] * stride_qd, mask=row_ok[:, None] & (dq[None, :] < HEAD_D), other=0.0)
        q_hi = tl.load(q_base + (2 * dq + 1)[None, :] * stride_qd, mask=row_ok[:, None] & (dq[None, :] < HEAD_D),
                       other=0.0)
    else:
        q_lo = tl.load(q_base + dq[None, :] * stride_qd, mask=row_ok[:, None] & (dq[None, :] < HEAD_D), other=0.0)
        q_hi = q_lo
    # The dots' operand types. Quantized sides run in float16 (codes become float16 bit patterns;
    # float32 q keeps float32). Triton's interpreter rounds float32 -> bfloat16 wrongly (not to
    # nearest: a biased error), so under "upcast" (CPU bf16) everything stays float32.
    if DOT_PRECISION == "upcast" or q_lo.dtype == tl.float32:
        kdt = tl.float32
        vdt = tl.float32
    else:
        if K_FMT == FMT_NONE or (K_FMT == FMT_INT8 and not ASM):  # int8: measured faster with q's own dtype (H200: 0.44 vs 0.53 ms)
            kdt = q_lo.dtype
        else:
            kdt = tl.float16
        if V_FMT == FMT_NONE or (V_FMT == FMT_INT8 and not ASM):
            vdt = q_lo.dtype
        else:
            vdt = tl.float16
    # Scores are qk times q_mult (log2 units). A bfloat16 q in a float16 dot would overflow past 65504: a tile
    # whose largest |q| reaches 2^15 is scaled down by a power of two first (exact), the scores back up.
    if SOFTCAP:
        q_mult = qk_scale / softcap
    else:
        q_mult = qk_scale * 1.4426950408889634
    if q_lo.dtype == tl.bfloat16 and kdt == tl.float16:
        q_lo, q_hi, up = _fit_half(q_lo, q_hi)
        q_mult = q_mult * up
    q_lo = q_lo.to(kdt)
    q_hi = q_hi.to(kdt)
    if K_SCALE == 3:
        k_group = dq // (K_GS // 2)  # nf4: the scale group of byte column dq (both nibbles)
    if V_SCALE == 3:
        v_group = tl.arange(0, BLOCK_DV) // (V_GS // 2)
    dv = tl.arange(0, BLOCK_DV)

    k_base = K + row_b * stride_kb + kvh * stride_kh
    v_base = V + row_b * stride_vb + kvh * stride_vh
    ks_base = KS + row_b * stride_ksb + kvh * stride_ksh
    vs_base = VS + row_b * stride_vsb + kvh * stride_vsh
    if ALIBI:
        slope2 = tl.load(SLOPES + b * stride_ab + head * stride_ah, mask=row_ok, other=0.0).to(tl.float32) \
            * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc_lo = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
    acc_hi = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        k_raw = _load_codes(k_base, cols, dq, col_ok, stride_kn, stride_kd, HEAD_D, K_FMT, True)
        if HALF_K:  # both nibbles of the same bytes
            k_lo, k_hi = _nibble_values(k_raw, LEVELS, kdt, ASM)
        else:
            k_lo = _side_values(k_raw, ks_base, cols, dq, col_ok, stride_ksn, stride_ksg, HEAD_D, K_FMT, K_SCALE, K_GS,
                                LEVELS, True, kdt, ASM)
        if K_SCALE == 3:  # nf4 groups: one dot per group (q's other columns zeroed), scaled per key
            qk = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
            for g in tl.static_range(K_NG):
                in_g = (k_group == g)[None, :]
                part = _mm(tl.where(in_g, q_lo, 0.0).to(kdt), k_lo, DOT_PRECISION, KEYS_AS_ROWS)
                part += _mm(tl.where(in_g, q_hi, 0.0).to(kdt), k_hi, DOT_PRECISION, KEYS_AS_ROWS)
                ks = tl.load(ks_base + cols * stride_ksn + g * stride_ksg, mask=col_ok, other=0.0)
                qk += part * ks[None, :]
        else:
            qk = _mm(q_lo, k_lo, DOT_PRECISION, KEYS_AS_ROWS)
            if HALF_K:
                qk += _mm(q_hi, k_hi, DOT_PRECISION, KEYS_AS_ROWS)
        if K_SCALE == 1:
            ks = tl.load(ks_base + cols * stride_ksn, mask=col_ok, other=0.0)
            qk = qk * (ks * K_CONST)[None, :]
        elif K_CONST != 1.0:
            qk = qk * K_CONST
        if SOFTCAP:
            s = softcap_tanh(qk * q_mult, SOFTCAP) * (softcap * 1.4426950408889634)
        else:
            s = qk * q_mult
        if ALIBI:
            s = s - slope2[:, None] * tl.abs(qi[:, None] + diag - cols[None, :]).to(tl.float32)
        ok = col_ok[None, :] & row_ok[:, None]
        if HAS_RIGHT:
            ok = ok & (cols[None, :] <= qi[:, None] + diag + right)
        if HAS_LEFT:
            ok = ok & (cols[None, :] >= qi[:, None] + diag - left)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_SCALE == 1:
            vsc = tl.load(vs_base + cols * stride_vsn, mask=col_ok, other=0.0)
            p = p * (vsc * V_CONST)[None, :]
        elif V_CONST != 1.0:
            p = p * V_CONST
        v_raw = _load_codes(v_base, cols, dv, col_ok, stride_vn, stride_vd, HEAD_DV, V_FMT, False)
        if HALF_V:  # both nibbles of the same bytes
            v_lo, v_hi = _nibble_values(v_raw, LEVELS, vdt, ASM)
        else:
            v_lo = _side_values(v_raw, vs_base, cols, dv, col_ok, stride_vsn, stride_vsg, HEAD_DV, V_FMT, V_SCALE,
                                V_GS, LEVELS, False, vdt, ASM)
        acc_lo = acc_lo * alpha[:, None]
        if HALF_V:
            acc_hi = acc_hi * alpha[:, None]
        if V_SCALE == 3:  # nf4 groups: each group's columns take the probabilities times its scales
            for g in tl.static_range(V_NG):
                vsc = tl.load(vs_base + cols * stride_vsn + g * stride_vsg, mask=col_ok, other=0.0)
                pg = (p * vsc[None, :]).to(vdt)
                in_g = (v_group == g)[None, :]
                acc_lo += tl.where(in_g, _mm(pg, v_lo, DOT_PRECISION, KEYS_AS_ROWS), 0.0)
                acc_hi += tl.where(in_g, _mm(pg, v_hi, DOT_PRECISION, KEYS_AS_ROWS), 0.0)
        else:
            acc_lo += _mm(p.to(vdt), v_lo, DOT_PRECISION, KEYS_AS_ROWS)
            if HALF_V:
                acc_hi += _mm(p.to(vdt), v_hi, DOT_PRECISION, KEYS_AS_ROWS)
        m_i = m_new

    if DIRECT and SINKS_ON:  # the sink joins the denominator (one split: nothing to merge)
        sink2 = tl.load(SINKS + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        m_new = tl.maximum(m_i, sink2)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.exp2(sink2 - m_new)
        acc_lo = acc_lo * alpha[:, None]
        acc_hi = acc_hi * alpha[:, None]
        m_i = m_new
    nonzero = l_i != 0  # not "> 0": a NaN sum must give NaN (out and LSE), as the reference says
    inv = tl.where(nonzero, 1.0 / tl.where(nonzero, l_i, 1.0), 0.0)
    if V_OUT != 1.0:  # the probabilities were lifted by 1 / V_OUT before the value dot (decode.py E5M2_LIFT)
        inv = inv * V_OUT
    lse2 = tl.where(nonzero, m_i + tl.log2(tl.where(nonzero, l_i, 1.0)), float("-inf"))
    out_lo = acc_lo * inv[:, None]
    out_hi = acc_hi * inv[:, None]
    if HALF_V:
        elem_lo = 2 * dv
        elem_hi = 2 * dv + 1
    else:
        elem_lo = dv
        elem_hi = dv
    col_mask = row_ok[:, None] & (dv[None, :] < HEAD_DV)
    out_dim: tl.constexpr = HEAD_DV * 2 if HALF_V else HEAD_DV
    if DIRECT:
        o_base = O + b.to(tl.int64) * stride_ob + qi[:, None] * stride_om + head[:, None] * stride_oh
        tl.store(o_base + elem_lo[None, :], out_lo.to(O.dtype.element_ty), mask=col_mask)
        if HALF_V:
            tl.store(o_base + elem_hi[None, :], out_hi.to(O.dtype.element_ty), mask=col_mask)
        tl.store(LSE + b.to(tl.int64) * stride_lb + head * stride_lh + qi, lse2 * 0.6931471805599453, mask=row_ok)
    else:
        # partials: ((b * Hq + head) * Lq + qi) * P + split, then out_dim floats
        heads_q = heads_kv * group
        part_row = ((b * heads_q + head) * seqlen_q + qi) * num_splits + split
        p_base = PART_O + part_row[:, None] * out_dim
        tl.store(p_base + elem_lo[None, :], out_lo, mask=col_mask)
        if HALF_V:
            tl.store(p_base + elem_hi[None, :], out_hi, mask=col_mask)
        tl.store(PART_LSE + part_row, lse2, mask=row_ok)


@triton.jit(do_not_specialize=["seqlen_q", "heads_q", "num_splits"])
def decode_merge_kernel(PART_O, PART_LSE, SINKS, O, LSE, stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
                        seqlen_q, heads_q, num_splits, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                        BLOCK_P: tl.constexpr, SINKS_ON: tl.constexpr):
    row = tl.program_id(0)  # (b * Hq + head) * Lq + qi
    qi = row % seqlen_q
    head = (row // seqlen_q) % heads_q
    b = row // (seqlen_q * heads_q)
    ps = tl.arange(0, BLOCK_P)
    p_ok = ps < num_splits
    lse2 = tl.load(PART_LSE + row * num_splits + ps, mask=p_ok, other=float("-inf"))
    m = tl.max(lse2, 0)
    if SINKS_ON:
        sink2 = tl.load(SINKS + head).to(tl.float32) * 1.4426950408889634
        m = tl.maximum(m, sink2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse2 - m_safe)
    total = tl.sum(w, 0)
    if SINKS_ON:
        total += tl.exp2(sink2 - m_safe)
    d = tl.arange(0, BLOCK_DV)
    parts = tl.load(PART_O + (row * num_splits + ps)[:, None] * HEAD_DV + d[None, :],
                    mask=p_ok[:, None] & (d[None, :] < HEAD_DV), other=0.0)
    merged = tl.sum(parts * w[:, None], 0)
    safe_total = tl.where(total != 0, total, 1.0)  # != : a NaN total stays NaN
    out = tl.where(total != 0, merged / safe_total, 0.0)
    tl.store(O + b.to(tl.int64) * stride_ob + qi * stride_om + head * stride_oh + d, out.to(O.dtype.element_ty), mask=d < HEAD_DV)
    lse = tl.where(total != 0, (m_safe + tl.log2(safe_total)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + b.to(tl.int64) * stride_lb + head * stride_lh + qi, lse)
