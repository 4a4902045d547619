"""Device helpers shared by the forward and backward kernels.

Scores are kept in base-2 units (multiplied by log2(e)) so the online softmax uses exp2, except with
an additive mask (score_unit says why); every additive term is converted on the way in and the LSE
is converted back.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Integer constants of kernels/dropout.py (the same hash in every backend).
MUL_A = 0x7FEB352D
MUL_B = 0x46CA68B5
ROW_SALT = 0x2545F491
COL_SALT = 0x1B873593
HEAD_SALT = 0x27D4EB2F


@triton.jit
def mix32(x):
    """kernels/dropout.py's mixer on uint32 (multiplication wraps, shifts are logical)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x46CA68B5
    return x ^ (x >> 16)


@triton.jit
def head_hash(seed, batch_head):
    bh = batch_head.to(tl.uint32) * 0x27D4EB2F
    return mix32(seed.to(tl.uint32) ^ bh)


@triton.jit
def keep_tile(hhash, rows, cols, threshold):
    """The bool keep mask of query positions `rows` and key positions `cols`, two tensors that broadcast to the
    tile (rows[:, None] and cols[None, :], or the transposed pair for a tile of keys x queries): the 24-bit draw
    of each element >= threshold."""
    row_hash = mix32(hhash ^ (rows.to(tl.uint32) * 0x2545F491))
    draw = mix32(row_hash ^ (cols.to(tl.uint32) * 0x1B873593)) >> 8
    return draw >= threshold


@triton.jit
def dot(a, b, DOT_PRECISION: tl.constexpr):
    """tl.dot; "upcast" multiplies in float32 (Triton's interpreter gets bfloat16 tl.dot wrong)."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def operand(x, like, DOT_PRECISION: tl.constexpr):
    """float32 x (P or dS) as a tl.dot operand in `like`'s dtype. Under "upcast" (Triton's interpreter)
    a bfloat16 operand stays float32: numpy's float32 -> bfloat16 cast there truncates where a GPU
    rounds to nearest, which made dV one bf16 ulp low on the CPU only."""
    if DOT_PRECISION == "upcast":
        if like.dtype == tl.bfloat16:
            return x
    return x.to(like.dtype)


@triton.jit
def stored(x, dtype: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """float32 x converted for a store in `dtype`, rounded to nearest even also under "upcast" (Triton's
    interpreter), whose float32 -> bfloat16 cast truncates: the bits are rounded first, after which the
    cast is exact (NaN and inf keep their bits; the largest floats round to inf, as a GPU's cast does)."""
    if DOT_PRECISION == "upcast":
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def tanh(x):
    """tanh without a library call. 1 - 2 / (e^{2x} + 1) saturates to +-1 without NaN (exp overflow
    gives inf, 2 / inf = 0) but keeps only absolute precision near 0 (about one float32 eps, which a
    softcap of 50 multiplies past the tolerance): below |x| = 0.55 the odd Taylor series to x^17 is
    used instead (truncation < 3e-9; within ~5 float32 ulps of tanh everywhere)."""
    x2 = x * x
    series = -929569.0 / 638512875.0 + x2 * (6404582.0 / 10854718875.0)
    series = 21844.0 / 6081075.0 + x2 * series
    series = -1382.0 / 155925.0 + x2 * series
    series = 62.0 / 2835.0 + x2 * series
    series = -17.0 / 315.0 + x2 * series
    series = 2.0 / 15.0 + x2 * series
    series = -1.0 / 3.0 + x2 * series
    series = x * (1.0 + x2 * series)
    return tl.where(tl.abs(x) < 0.55, series, 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))


@triton.jit
def softcap_tanh(x, SOFTCAP: tl.constexpr):
    """tanh for the softcap: SOFTCAP 2 (binding.softcap_mode: float16/bfloat16 on a GPU) the hardware's
    tanh.approx.f32, else the exact form above."""
    if SOFTCAP == 2:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    return tanh(x)


@triton.jit
def split_range(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Split the block loop [lo, hi) (lo a multiple of BLOCK) into masked / unmasked / masked parts.

    Blocks starting in [b, c) lie inside [full_lo, full_hi) entirely and need no per-element checks;
    the caller loops [lo, b) and [c, hi) with checks. Inputs may be negative: clamp before dividing
    (Triton's integer division truncates toward zero). No tl.cdiv (nor tl.zeros): jit functions of
    triton.language, which the interpreted copy of these kernels cannot call (backend.py).
    """
    hi_ceil = (tl.maximum(hi, 0) + BLOCK - 1) // BLOCK * BLOCK
    b = (tl.maximum(full_lo, 0) + BLOCK - 1) // BLOCK * BLOCK
    b = tl.minimum(tl.maximum(lo, b), hi_ceil)
    c = (tl.maximum(full_hi, 0) // BLOCK) * BLOCK
    c = tl.maximum(b, tl.minimum(c, hi_ceil))
    return b, c


@triton.jit
def score_unit(MASK_KIND: tl.constexpr):
    """Scores per natural logit: log2(e) (base-2 logits, so the softmax uses exp2), except with an
    additive mask: 1, so the mask is added exactly. finfo(float32).min * log2(e) overflows to -inf,
    which would turn a row that transformers masks with finfo.min (softmax: uniform, the mean of V)
    into an empty row. exp2 then takes (s - m) * log2(e) / unit."""
    if MASK_KIND == 2:
        return 1.0
    return 1.4426950408889634


@triton.jit
def transform_scores(qk, rows, cols, diag, scale, softcap, slope2, mask_ptrs, mask_ok,
                     SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr):
    """qk (raw dot products) -> scores in score_unit(MASK_KIND); also returns the softcap tanh for backward.

    rows/cols: query and key positions within the sequence, broadcasting to qk's tile (rows[:, None] and
    cols[None, :], or the transposed pair for keys x queries); diag = Lk - Lq (bottom-right alignment). slope2 is
    the ALiBi slope times score_unit. MASK_KIND: 0 none, 1 bool (True = attend), 2 additive.
    """
    unit = score_unit(MASK_KIND)
    if SOFTCAP:
        capped = softcap_tanh(qk * (scale / softcap), SOFTCAP)
        s = capped * (softcap * unit)
    else:
        capped = qk
        s = qk * (scale * unit)
    if ALIBI:
        distance = tl.abs(rows + diag - cols).to(tl.float32)
        s = s - slope2 * distance
    if MASK_KIND == 1:
        allowed = tl.load(mask_ptrs, mask=mask_ok, other=0)
        s = tl.where(allowed != 0, s, float("-inf"))
    elif MASK_KIND == 2:
        bias = tl.load(mask_ptrs, mask=mask_ok, other=float("-inf")).to(tl.float32)
        s = s + bias  # natural units here (score_unit): added exactly
    return s, capped


@triton.jit
def visible(s, rows, cols, diag, left, right, seqlen_k, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """-inf where key col is outside the window of query row or past the sequence (rows, cols: positions
    broadcasting to s's tile, as transform_scores takes them)."""
    ok = cols < seqlen_k
    if HAS_RIGHT:
        ok = ok & (cols <= rows + diag + right)
    if HAS_LEFT:
        ok = ok & (cols >= rows + diag - left)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def load_rows(base, idx, idx_ok, stride_n, offs_d, stride_d, HEAD_D: tl.constexpr):
    """A (len(idx), len(offs_d)) tile of rows idx (tokens) and head-dim columns offs_d; zero past the
    sequence (idx_ok) and past the real head dim."""
    return tl.load(base + idx[:, None] * stride_n + offs_d[None, :] * stride_d,
                   mask=idx_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)


@triton.jit
def sequence_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """Where sequence b starts in (packed) q and k, and its lengths: dense batches start at 0."""
    start_q = 0
    start_k = 0
    if VARLEN:
        start_q = tl.load(CU_Q + b)
        start_k = tl.load(CU_K + b)
        seqlen_q = tl.load(CU_Q + b + 1) - start_q
        seqlen_k = tl.load(CU_K + b + 1) - start_k
    return start_q, start_k, seqlen_q, seqlen_k


@triton.jit
def query_block_band(m0, diag, left, right, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Keys [lo, hi) any row of the query block at m0 can see, and [mid_lo, mid_hi) of whole key
    blocks every row sees entirely (no per-element band checks there)."""
    lo = 0
    hi = seqlen_k
    full_lo = 0
    full_hi = seqlen_k
    if HAS_LEFT:
        lo = tl.maximum(m0 + diag - left, 0) // BLOCK_N * BLOCK_N
        full_lo = m0 + BLOCK_M - 1 + diag - left
    if HAS_RIGHT:
        hi = tl.minimum(seqlen_k, m0 + BLOCK_M + diag + right)
        full_hi = tl.minimum(seqlen_k, m0 + diag + right + 1)
    mid_lo, mid_hi = split_range(lo, hi, full_lo, full_hi, BLOCK_N)
    return lo, hi, mid_lo, mid_hi
