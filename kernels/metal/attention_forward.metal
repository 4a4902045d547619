// FlashAttention-2 forward for Apple GPUs: online softmax in base 2, fp32 accumulation.
//
// One threadgroup = MFA_WM simdgroups x 8 query rows (BQ = 8 * MFA_WM rows) of one (batch, head).
// Per key block of MFA_BK keys: K and V are staged in threadgroup memory, S = Q K^T is computed
// with 8x8 simdgroup_matrix products into float fragments, the scores are scaled (log2(e) is
// folded into the scale, so the softmax uses exp2), capped, biased and masked in place, turned
// into P in the same registers, and O += P V. Only the key blocks the window leaves visible to
// some row of the threadgroup are visited; blocks fully inside every row's window skip the
// element-wise visibility test.
//
// Variants are made by the loader's #defines (compile_shader has no function constants):
//   MFA_IN_T            half | bfloat | float: q, k, v and out
//   MFA_DQK, MFA_DV         the real head dims; MFA_DQK_PAD, MFA_DV_PAD rounded up to 8 (padding reads as 0)
//   MFA_BK, MFA_WM          keys per block, simdgroups per threadgroup (BQ = 8 * MFA_WM query rows)
//   MFA_K_PITCH, MFA_V_PITCH, MFA_Q_PITCH   row pitch of the threadgroup tiles (elements)
//   MFA_SHARED_KV       1: K and V take turns in one tile (stage K, barrier, S and P, barrier, stage
//                   V, barrier, O += P V); 0: both staged at once in their own tiles
//   MFA_Q_IN_TG         1: Q is staged in threadgroup memory and re-read per product (large head
//                   dims, where Q fragments would take too many registers); 0: Q in registers
//   MFA_MASK_KIND       0 none, 1 bool (uchar, nonzero = attend), 2 additive (MFA_MASK_T)
//   MFA_HAS_SOFTCAP, MFA_HAS_ALIBI, MFA_HAS_SINKS, MFA_VARLEN, MFA_CU_T (int | long: cu_seqlens' type)
//   MFA_LONG_POSITIONS  0: positions (rows, keys, lengths, windows) and the mask's key stride times
//                   64 fit 32 bits with room (forward.py's POSITION_LIMIT, checked on the host), so
//                   the block loop, the visibility bounds and the mask/ALiBi index arithmetic are
//                   `int`; 1: the general path for huge problems, the same code on `long`
//   MFA_ATTENTION_PARAM_COUNT   the number of int64 fields the host passes (size check)
//
// Launch: threads = (32 * MFA_WM * ceil(max Lq / BQ), Hq, B), group_size = (32 * MFA_WM, 1, 1).
#include <metal_stdlib>
using namespace metal;
// The loader inserts the variant's MFA_ #defines here: after Apple's headers, which a macro
// defined before them could rewrite.
#include "attention_params.h"
#include "bounds.h"
#include "finite_math.h"
#include "fragment.h"
#include "staging.h"

#define BQ (8 * MFA_WM)
#define THREADS (32 * MFA_WM)
#define DQK_BLOCKS (MFA_DQK_PAD / 8)
#define DV_BLOCKS (MFA_DV_PAD / 8)
#define KEY_FRAGMENTS (MFA_BK / 8)

constant float LOG2E = 1.4426950408889634f;
constant float LN2 = 0.6931471805599453f;
// Score units: base-2 logits (log2(e) folded into the scale, so P = exp2(s - m)), except with an
// additive mask, which is added exactly in natural units: finfo(float32).min * log2(e) would
// overflow to -inf and turn a row that transformers masks with finfo.min (softmax: uniform, the
// mean of V) into an empty row (0). The host scales q_scale and cap_scale by the same unit.
#if MFA_MASK_KIND == 2
#define SCORE_UNIT 1.0f
#else
#define SCORE_UNIT LOG2E
#endif
#define TO_LOG2 (LOG2E / SCORE_UNIT)

// Sequence positions. Row pointers are 64-bit only in the per-(batch, head) bases and the
// per-block pointer increments; everything indexed by a position below is pos_t.
#if MFA_LONG_POSITIONS
typedef long pos_t;
#else
typedef int pos_t;
#endif
inline pos_t pmin(pos_t a, pos_t b) { return a < b ? a : b; }
inline pos_t pmax(pos_t a, pos_t b) { return a > b ? a : b; }
inline pos_t pclamp(pos_t x, pos_t lo, pos_t hi) { return pmin(pmax(x, lo), hi); }


[[kernel, max_total_threads_per_threadgroup(THREADS)]] void attention_forward(
    device const MFA_IN_T* q [[buffer(0)]],
    device const MFA_IN_T* k [[buffer(1)]],
    device const MFA_IN_T* v [[buffer(2)]],
    device MFA_IN_T* out [[buffer(3)]],
    device float* lse [[buffer(4)]],
    constant AttentionParams& p [[buffer(5)]],
    constant float& q_scale [[buffer(6)]],    // scale * SCORE_UNIT; with softcap, scale / softcap
    constant float& cap_scale [[buffer(7)]],  // softcap * SCORE_UNIT (read only with MFA_HAS_SOFTCAP)
    device const MFA_MASK_T* mask [[buffer(8)]],
    device const float* alibi_slopes [[buffer(9)]],
    device const float* sinks [[buffer(10)]],
    device const MFA_CU_T* cu_seqlens_q [[buffer(11)]],
    device const MFA_CU_T* cu_seqlens_k [[buffer(12)]],
    uint3 group_id [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]],
    ushort tid [[thread_index_in_threadgroup]]) {
  const long batch = group_id.z, head = group_id.y, kv_head = head / p.group;
#if MFA_VARLEN
  // Offsets are clamped into the packed tensors: the host does not read them back off the CPU.
  const long q_start = clamp_index(long(cu_seqlens_q[batch]), 0, p.total_q);
  const long k_start = clamp_index(long(cu_seqlens_k[batch]), 0, p.total_k);
  const pos_t seqlen_q = pos_t(clamp_index(long(cu_seqlens_q[batch + 1]), q_start, p.total_q) - q_start);
  const pos_t seqlen_k = pos_t(clamp_index(long(cu_seqlens_k[batch + 1]), k_start, p.total_k) - k_start);
#else
  const long q_start = 0, k_start = 0;
  const pos_t seqlen_q = pos_t(p.seqlen_q), seqlen_k = pos_t(p.seqlen_k);
#endif
  const pos_t block_row0 = pos_t(group_id.x) * BQ;
  if (block_row0 >= seqlen_q) return;  // the whole threadgroup: a shorter sequence of a varlen batch
  const pos_t window_left = pos_t(p.window_left), window_right = pos_t(p.window_right);  // -1: unbounded
  const int vector_rows = int(p.vector_rows);

  device const MFA_IN_T* q_seq = q + batch * p.q_stride_b + q_start * p.q_stride_s + head * p.q_stride_h;
  device const MFA_IN_T* k_seq = k + batch * p.k_stride_b + k_start * p.k_stride_s + kv_head * p.k_stride_h;
  device const MFA_IN_T* v_seq = v + batch * p.v_stride_b + k_start * p.v_stride_s + kv_head * p.v_stride_h;

#if MFA_SHARED_KV
  threadgroup MFA_IN_T kv_tile[MFA_BK * (MFA_K_PITCH > MFA_V_PITCH ? MFA_K_PITCH : MFA_V_PITCH)];
  threadgroup MFA_IN_T* const k_tile = kv_tile;
  threadgroup MFA_IN_T* const v_tile = kv_tile;
#else
  threadgroup MFA_IN_T k_tile[MFA_BK * MFA_K_PITCH];
  threadgroup MFA_IN_T v_tile[MFA_BK * MFA_V_PITCH];
#endif

  const FragmentLane at = fragment_lane(lane);
  const pos_t sg_row0 = block_row0 + sg * 8;
  const pos_t row = sg_row0 + at.row;  // this lane's query row
  const bool row_in = row < seqlen_q;
  const pos_t offset = seqlen_k - seqlen_q;  // bottom-right alignment: row i's diagonal is i + offset

#if MFA_Q_IN_TG
  threadgroup MFA_IN_T q_tile[BQ * MFA_Q_PITCH];
  stage_block<MFA_IN_T, MFA_DQK_PAD, MFA_DQK, MFA_Q_PITCH, BQ, THREADS>(
      q_tile, q_seq + long(block_row0) * p.q_stride_s, int(pmin(seqlen_q - block_row0, BQ)), p.q_stride_s,
      p.q_stride_d, vector_rows & 1, tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
#else
  simdgroup_float8x8 q_frag[DQK_BLOCKS];
  device const MFA_IN_T* q_row = q_seq + long(row_in ? row : 0) * p.q_stride_s;
  const bool q_unit = vector_rows & 1;  // stride_d == 1: 32-bit column offsets
  for (int d = 0; d < DQK_BLOCKS; ++d) {
    for (int e = 0; e < 2; ++e) {
      const int col = d * 8 + at.col + e;
      const MFA_IN_T x = (row_in && col < MFA_DQK) ? (q_unit ? q_row[col] : q_row[col * p.q_stride_d]) : MFA_IN_T(0.0f);
      q_frag[d].thread_elements()[e] = float(x);
    }
  }
#endif

  // The key blocks some row of this threadgroup can see.
  const pos_t last_row = pmin(block_row0 + BQ, seqlen_q) - 1;
  const pos_t first_key = window_left >= 0 ? pmax(block_row0 + offset - window_left, 0) : 0;
  const pos_t end_key = window_right >= 0 ? pmin(last_row + offset + window_right + 1, seqlen_k) : seqlen_k;
  const pos_t sg_last = pmin(sg_row0 + 7, seqlen_q - 1);

#if MFA_HAS_ALIBI
  const float slope = alibi_slopes[batch * p.alibi_stride_b + head] * SCORE_UNIT;
#endif
#if MFA_MASK_KIND
  const pos_t mask_k = pos_t(p.mask_stride_k);  // the key block's elements: 32-bit offsets from its pointer
  const long mask_step = MFA_BK * p.mask_stride_k;
#endif

  // Running max (in score units, finite from the start: see finite_math.h) and sum; a sink is a
  // key of value 0 seen before all others, and a sink of -inf is no key at all.
  float m = LOWEST_FINITE, l = 0.0f;
#if MFA_HAS_SINKS
  const Stored sink = read_stored(sinks, head);
  if (!sink.neg_inf) {
    m = sink.value * SCORE_UNIT;
    l = 1.0f;
  }
#endif
  simdgroup_float8x8 o[DV_BLOCKS];
  for (int d = 0; d < DV_BLOCKS; ++d) o[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

  // The block loop walks 32-bit positions (pos_t) and advances the K, V (and mask) block pointers
  // by increments fixed per launch: no 64-bit row arithmetic per block.
  pos_t key0 = (first_key / MFA_BK) * MFA_BK;
  const long k_step = MFA_BK * p.k_stride_s, v_step = MFA_BK * p.v_stride_s;
  device const MFA_IN_T* k_block = k_seq + long(key0) * p.k_stride_s;
  device const MFA_IN_T* v_block = v_seq + long(key0) * p.v_stride_s;
#if MFA_MASK_KIND
  device const MFA_MASK_T* mask_block = mask + batch * p.mask_stride_b + head * p.mask_stride_h +
                                        long(row) * p.mask_stride_q + long(key0) * p.mask_stride_k;
#endif
  for (; key0 < end_key; key0 += MFA_BK, k_block += k_step, v_block += v_step) {
    // Real keys of the block (key0 < end_key <= seqlen_k, so at least one).
    const int keys_in = int(pmin(seqlen_k - key0, MFA_BK));
    stage_block<MFA_IN_T, MFA_DQK_PAD, MFA_DQK, MFA_K_PITCH, MFA_BK, THREADS>(k_tile, k_block, keys_in, p.k_stride_s,
                                                                          p.k_stride_d, vector_rows & 2, tid);
#if !MFA_SHARED_KV
    stage_block<MFA_IN_T, MFA_DV_PAD, MFA_DV, MFA_V_PITCH, MFA_BK, THREADS>(v_tile, v_block, keys_in, p.v_stride_s,
                                                                        p.v_stride_d, vector_rows & 4, tid);
#endif
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // S = Q K^T: 8 rows x MFA_BK keys per simdgroup; K^T is read from the tile by swapping strides.
    // The head dim is the outer loop, so a Q fragment staged in threadgroup memory is read once per
    // block, not once per key fragment; each s[j] still sums over d in ascending order.
    simdgroup_float8x8 s[KEY_FRAGMENTS];
    for (int j = 0; j < KEY_FRAGMENTS; ++j) s[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    for (int d = 0; d < DQK_BLOCKS; ++d) {
#if MFA_Q_IN_TG
      simdgroup_float8x8 qd;
      load_fragment(qd, q_tile + sg * 8 * MFA_Q_PITCH + d * 8, MFA_Q_PITCH, 1, at);
#else
      const simdgroup_float8x8 qd = q_frag[d];
#endif
      for (int j = 0; j < KEY_FRAGMENTS; ++j) {
        simdgroup_float8x8 kt;
        load_fragment(kt, k_tile + j * 8 * MFA_K_PITCH + d * 8, 1, MFA_K_PITCH, at);
        simdgroup_multiply_accumulate(s[j], qd, kt, s[j]);
      }
    }

    // Blocks inside every row's window (and the sequence) need no per-element visibility test.
    const bool inside = keys_in == MFA_BK &&
                        (window_left < 0 || key0 >= sg_last + offset - window_left) &&
                        (window_right < 0 || key0 + MFA_BK - 1 <= sg_row0 + offset + window_right);
    // This row's visible keys of the block as offsets from key0 (clamped into [-1, BK]), so the
    // per-element test below is on `int` whatever pos_t is: [lo, hi] and < keys_in.
    const int lo = window_left < 0 ? -1 : int(pclamp(row + offset - window_left - key0, -1, MFA_BK));
    const int hi = window_right < 0 ? MFA_BK : int(pclamp(row + offset + window_right - key0, -1, MFA_BK));
    // Visibility is a flag, never a -inf score: the maximum is taken over visible scores only and
    // an invisible key's P is 0 by selection.
    float tile_max = LOWEST_FINITE;
    bool visible_at[KEY_FRAGMENTS][2];
    for (int j = 0; j < KEY_FRAGMENTS; ++j) {
      for (int e = 0; e < 2; ++e) {
        const int kk = j * 8 + at.col + e;  // key0 + kk is the key
        float x = s[j].thread_elements()[e] * q_scale;
#if MFA_HAS_SOFTCAP
        x = precise::tanh(x) * cap_scale;
#endif
#if MFA_HAS_ALIBI
        x -= slope * fabs(float(row + offset - key0 - kk));
#endif
        bool visible = inside || (kk < keys_in && kk >= lo && kk <= hi);
#if MFA_MASK_KIND == 1
        visible = visible && row_in && kk < keys_in && mask_block[kk * mask_k] != 0;
#elif MFA_MASK_KIND == 2
        if (visible && row_in) {
          const Stored bias = read_stored(mask_block + kk * mask_k, 0);
          visible = !bias.neg_inf;  // a -inf entry removes the key, as in the reference
          x += bias.value;
        }
#endif
        visible_at[j][e] = visible;
        s[j].thread_elements()[e] = x;
        if (visible) tile_max = max(tile_max, x);
      }
    }

    // Online softmax: rescale what came before by exp2(m - m_new); P overwrites S in registers.
    // Before any visible key m is LOWEST_FINITE and l and O are 0, so the correction's value does
    // not matter; a NaN score (max() skips it) still reaches l and O as NaN, as the reference says.
    const float m_new = max(m, row_max(tile_max));
    const float correction = exp2_of_nonpositive((m - m_new) * TO_LOG2);
    float block_sum = 0.0f;
    for (int j = 0; j < KEY_FRAGMENTS; ++j) {
      for (int e = 0; e < 2; ++e) {
        const float pe =
            visible_at[j][e] ? exp2_of_nonpositive((s[j].thread_elements()[e] - m_new) * TO_LOG2) : 0.0f;
        s[j].thread_elements()[e] = pe;
        block_sum += pe;
      }
    }
    l = l * correction + row_sum(block_sum);
    m = m_new;

#if MFA_SHARED_KV
    threadgroup_barrier(mem_flags::mem_threadgroup);  // every simdgroup is done with K: V takes its tile
    stage_block<MFA_IN_T, MFA_DV_PAD, MFA_DV, MFA_V_PITCH, MFA_BK, THREADS>(v_tile, v_block, keys_in, p.v_stride_s,
                                                                        p.v_stride_d, vector_rows & 4, tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
#endif
    // O = O * correction + P V.
    for (int d = 0; d < DV_BLOCKS; ++d) {
      o[d].thread_elements() *= correction;
      for (int j = 0; j < KEY_FRAGMENTS; ++j) {
        simdgroup_float8x8 vf;
        load_fragment(vf, v_tile + j * 8 * MFA_V_PITCH + d * 8, MFA_V_PITCH, 1, at);
        simdgroup_multiply_accumulate(o[d], s[j], vf, o[d]);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the next block overwrites k_tile and v_tile
#if MFA_MASK_KIND
    mask_block += mask_step;
#endif
  }

  if (!row_in) return;
  // A row that saw nothing (l == 0) writes 0 and LSE -inf (by its bits); l is compared with 0, not
  // "> 0", so that a NaN propagates as the reference says.
  const float inv = l == 0.0f ? 0.0f : 1.0f / l;
  device MFA_IN_T* out_row = out + batch * p.o_stride_b + (q_start + row) * p.o_stride_s + head * p.o_stride_h;
  const int o_d = int(p.o_stride_d);  // the host allocates out contiguous: 1
  for (int d = 0; d < DV_BLOCKS; ++d) {
    for (int e = 0; e < 2; ++e) {
      const int col = d * 8 + at.col + e;
      if (col < MFA_DV) out_row[col * o_d] = MFA_IN_T(o[d].thread_elements()[e] * inv);
    }
  }
  if (at.col == 0) {
    store_or_neg_inf(lse, batch * p.lse_stride_b + head * p.lse_stride_h + (q_start + row) * p.lse_stride_s,
                     l != 0.0f, m / SCORE_UNIT + log2(l) * LN2);
  }
}
