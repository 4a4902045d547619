// FlashAttention-2 backward for Apple GPUs: P is recomputed from the saved LSE, fp32 accumulation.
//
//   attention_backward_preprocess  delta_i = rowsum(dO_i * O_i) - dLSE_i       (one simdgroup a row)
//   attention_backward_dq          dQ for a block of query rows, over the keys they see
//   attention_backward_dkdv        dK, dV for a block of keys of one KV head, over the G query
//                                  heads of its group and the rows that see them: the GQA
//                                  reduction happens in registers, with no atomics.
//
// Per (row i, key j): s = q.k * scale (softcap: c * tanh(s / c)), minus ALiBi, plus an additive
// mask; p = exp(s - lse_i); dp = dO_i . v_j; ds = p (dp - delta_i), times (1 - tanh^2) under
// softcap. dQ += ds scale k, dK += ds scale q, dV += p dO. dmask (additive masks, when asked) is
// ds before the softcap factor, written per (b, query head, i, j) by the dQ kernel and summed
// over broadcast dims by the host. dsinks needs only lse and delta: the host computes it.
//
// Both gradient kernels run on 8x8 simdgroup_matrix products with float fragments (fragment.h) and tiles
// staged in threadgroup memory (staging.h): a threadgroup = MFA_WM simdgroups x 8 query rows (dQ) or 8 keys
// (dK/dV). The operands a threadgroup keeps (dQ: Q, dO; dK/dV: K, V) are fragments in registers, or with
// MFA_HELD_IN_TG (head dims above 128) staged once in threadgroup memory; the streamed ones (K, V or Q,
// dO) are staged per block of MFA_BK, in one shared tile with MFA_HELD_IN_TG. Block skipping: each
// threadgroup visits only the key (query) range that the causal/window band leaves visible to some of
// its rows (keys). The lane-wise kernels at the end (lanes over the head dim, MFA_R rows or keys per
// simdgroup, one simd_sum per dot product) are compiled only without MFA_MMA: backward.MMA_MAX_DIM = 0,
// the counter baseline.
//
// Defines: MFA_IN_T, MFA_MASK_T, MFA_MASK_KIND (0 none, 1 bool, 2 additive), MFA_CU_T, MFA_DQK, MFA_DV, MFA_WM, MFA_R,
// MFA_HAS_SOFTCAP, MFA_HAS_ALIBI, MFA_HAS_DLSE, MFA_WANT_DMASK, MFA_VARLEN, MFA_BACKWARD_PARAM_COUNT;
// MFA_MMA with MFA_BK, MFA_HELD_IN_TG, MFA_DQK_PAD, MFA_DV_PAD, MFA_K_PITCH, MFA_V_PITCH (blocks and tile
// pitches: backward.mma_blocks).
#include <metal_stdlib>
using namespace metal;
// The loader inserts the variant's MFA_ #defines here, after Apple's headers.
#include "backward_params.h"
#include "bounds.h"
#include "finite_math.h"
#include "fragment.h"
#include "staging.h"

#define THREADS (32 * MFA_WM)
#define BLOCK (MFA_WM * MFA_R)  // query rows (dQ) or keys (dK/dV) per threadgroup
#define DL ((MFA_DQK + 31) / 32)
#define DVL ((MFA_DV + 31) / 32)


struct Sequence {
  long q_start, k_start, seqlen_q, seqlen_k;
};

inline Sequence sequence_of(constant BackwardParams& p, device const MFA_CU_T* cu_q, device const MFA_CU_T* cu_k, long b) {
  Sequence s;
#if MFA_VARLEN
  // Offsets are clamped into the packed tensors: the host does not read them back off the CPU.
  s.q_start = clamp_index(long(cu_q[b]), 0, p.total_q);
  s.k_start = clamp_index(long(cu_k[b]), 0, p.total_k);
  s.seqlen_q = clamp_index(long(cu_q[b + 1]), s.q_start, p.total_q) - s.q_start;
  s.seqlen_k = clamp_index(long(cu_k[b + 1]), s.k_start, p.total_k) - s.k_start;
#else
  s.q_start = 0;
  s.k_start = 0;
  s.seqlen_q = p.seqlen_q;
  s.seqlen_k = p.seqlen_k;
#endif
  return s;
}

// This lane's N elements (columns lane * N + t) of a row, as float (zero past the real dim).
// `unit` (stride_d == 1, tested once per kernel): 32-bit column offsets; else 64-bit ones.
template <int N, int D>
inline void load_lane(thread float* dst, device const MFA_IN_T* row, long stride_d, bool unit, ushort lane) {
  for (int t = 0; t < N; ++t) {
    const int c = lane * N + t;
    dst[t] = c < D ? float(unit ? row[c] : row[c * stride_d]) : 0.0f;
  }
}

template <int N, int D>
inline void store_lane(device MFA_IN_T* row, long stride_d, thread const float* src, ushort lane) {
  for (int t = 0; t < N; ++t) {
    const int c = lane * N + t;
    if (c < D) row[c * stride_d] = MFA_IN_T(src[t]);
  }
}

template <int N>
inline float lane_dot(thread const float* a, thread const float* b) {
  float x = 0.0f;
  for (int t = 0; t < N; ++t) x += a[t] * b[t];
  return simd_sum(x);
}

// The score pieces of one (row, key): p and the factor that turns ds into d(q.k).
struct Prob {
  float p;
  float chain;  // d s / d (q.k): scale, times (1 - tanh^2) under softcap
};

inline bool is_visible(constant BackwardParams& p, long i, long j, long offset) {
  return (p.window_left < 0 || j >= i + offset - p.window_left) && (p.window_right < 0 || j <= i + offset + p.window_right);
}

inline Prob probability(float dot, float lse, float scale, float softcap, float slope, float bias, long distance) {
  Prob out;
  float s = dot * scale;
  out.chain = scale;
#if MFA_HAS_SOFTCAP
  const float t = precise::tanh(s / softcap);
  s = softcap * t;
  out.chain = scale * (1.0f - t * t);
#endif
#if MFA_HAS_ALIBI
  s -= slope * fabs(float(distance));
#endif
  s += bias;
  out.p = exp(s - lse);
  return out;
}

// Rows that saw nothing have LSE -inf (tested by its bits: finite_math.h); the largest finite float
// there makes p = exp(s - lse) = 0 without any infinity.
inline float safe_lse(device const float* lse, long slot) {
  const Stored s = read_stored(lse, slot);
  return s.neg_inf ? -LOWEST_FINITE : s.value;
}

[[kernel, max_total_threads_per_threadgroup(32)]] void attention_backward_preprocess(
    device const MFA_IN_T* out [[buffer(0)]],
    device const MFA_IN_T* grad_out [[buffer(1)]],
    device const float* grad_lse [[buffer(2)]],
    device float* delta [[buffer(3)]],
    constant BackwardParams& p [[buffer(4)]],
    device const MFA_CU_T* cu_seqlens_q [[buffer(5)]],
    device const MFA_CU_T* cu_seqlens_k [[buffer(6)]],
    uint3 group_id [[threadgroup_position_in_grid]],
    ushort lane [[thread_index_in_simdgroup]]) {
  const long b = group_id.z, head = group_id.y, i = group_id.x;
  const Sequence seq = sequence_of(p, cu_seqlens_q, cu_seqlens_k, b);
  if (i >= seq.seqlen_q) return;
  const long row = seq.q_start + i;
  float o[DVL], d_o[DVL];
  load_lane<DVL, MFA_DV>(o, out + b * p.o_stride_b + row * p.o_stride_s + head * p.o_stride_h, p.o_stride_d,
                         p.o_stride_d == 1, lane);
  load_lane<DVL, MFA_DV>(d_o, grad_out + b * p.do_stride_b + row * p.do_stride_s + head * p.do_stride_h, p.do_stride_d,
                         p.do_stride_d == 1, lane);
  float x = lane_dot<DVL>(o, d_o);
  const long slot = b * p.lse_stride_b + head * p.lse_stride_h + row * p.lse_stride_s;
#if MFA_HAS_DLSE
  x -= grad_lse[slot];
#endif
  if (lane == 0) delta[slot] = x;
}

#if MFA_MMA
// dQ on 8x8 simdgroup_matrix products: a threadgroup = MFA_WM simdgroups x 8 query rows of one (batch,
// query head). Up to D = 128 Q and dO are fragments in registers; beyond (MFA_HELD_IN_TG) they are staged
// once in threadgroup memory and re-read per product, as the forward does with Q, and K and V take turns
// in one tile. Per key block of MFA_BK keys, K and V are staged in threadgroup memory, S = Q K^T and
// dP = dO V^T are float fragments, dS = P (dP - delta) chain replaces S in the same registers (the
// accumulator layout is the A-operand layout), and dQ += dS K. Each dS element is this lane's own: the
// dmask write needs no reduction.
#define BQ (8 * MFA_WM)
#define DQK_BLOCKS (MFA_DQK_PAD / 8)
#define DV_BLOCKS (MFA_DV_PAD / 8)
#define KEY_FRAGMENTS (MFA_BK / 8)
#define SHARED_PITCH (MFA_K_PITCH > MFA_V_PITCH ? MFA_K_PITCH : MFA_V_PITCH)

[[kernel, max_total_threads_per_threadgroup(THREADS)]] void attention_backward_dq(
    device const MFA_IN_T* q [[buffer(0)]],
    device const MFA_IN_T* k [[buffer(1)]],
    device const MFA_IN_T* v [[buffer(2)]],
    device const MFA_IN_T* grad_out [[buffer(3)]],
    device const float* lse [[buffer(4)]],
    device const float* delta [[buffer(5)]],
    device MFA_IN_T* dq [[buffer(6)]],
    device float* dmask [[buffer(7)]],  // MFA_WANT_DMASK: (B, Hq, Lq, Lk) contiguous
    device const MFA_MASK_T* mask [[buffer(8)]],
    device const float* alibi_slopes [[buffer(9)]],
    device const MFA_CU_T* cu_seqlens_q [[buffer(10)]],
    device const MFA_CU_T* cu_seqlens_k [[buffer(11)]],
    constant BackwardParams& p [[buffer(12)]],
    constant float& scale [[buffer(13)]],
    constant float& softcap [[buffer(14)]],
    uint3 group_id [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]],
    ushort tid [[thread_index_in_threadgroup]]) {
  const long b = group_id.z, head = group_id.y, kv_head = head / p.group;
  const Sequence seq = sequence_of(p, cu_seqlens_q, cu_seqlens_k, b);
  const long block0 = long(group_id.x) * BQ;
  if (block0 >= seq.seqlen_q) return;  // the whole threadgroup
  const long offset = seq.seqlen_k - seq.seqlen_q;
  const int vector_rows = int(p.vector_rows);

  const FragmentLane at = fragment_lane(lane);
  const long sg_row0 = block0 + sg * 8;
  const long i = sg_row0 + at.row;  // this lane's query row
  const bool row_in = i < seq.seqlen_q;
  const long row = seq.q_start + (row_in ? i : 0);
  simdgroup_float8x8 dq_acc[DQK_BLOCKS];
  for (int d = 0; d < DQK_BLOCKS; ++d) dq_acc[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
#if MFA_HELD_IN_TG
  // Q and dO of the threadgroup's rows, staged once (the first key block's barrier publishes them).
  threadgroup MFA_IN_T q_held[BQ * MFA_K_PITCH];
  threadgroup MFA_IN_T do_held[BQ * MFA_V_PITCH];
  threadgroup MFA_IN_T kv_tile[MFA_BK * SHARED_PITCH];  // K and V take turns
#define K_TILE kv_tile
#define V_TILE kv_tile
  {
    const int rows_in = int(lmin(seq.seqlen_q - block0, BQ));
    device const MFA_IN_T* q_block = q + b * p.q_stride_b + head * p.q_stride_h + (seq.q_start + block0) * p.q_stride_s;
    device const MFA_IN_T* do_block =
        grad_out + b * p.do_stride_b + head * p.do_stride_h + (seq.q_start + block0) * p.do_stride_s;
    stage_block<MFA_IN_T, MFA_DQK_PAD, MFA_DQK, MFA_K_PITCH, BQ, THREADS>(q_held, q_block, rows_in, p.q_stride_s,
                                                                      p.q_stride_d, vector_rows & 4, tid);
    stage_block<MFA_IN_T, MFA_DV_PAD, MFA_DV, MFA_V_PITCH, BQ, THREADS>(do_held, do_block, rows_in, p.do_stride_s,
                                                                    p.do_stride_d, vector_rows & 8, tid);
  }
#define Q_OPERAND(frag, d) load_fragment(frag, q_held + sg * 8 * MFA_K_PITCH + (d) * 8, MFA_K_PITCH, 1, at)
#define DO_OPERAND(frag, d) load_fragment(frag, do_held + sg * 8 * MFA_V_PITCH + (d) * 8, MFA_V_PITCH, 1, at)
#else
  threadgroup MFA_IN_T k_tile[MFA_BK * MFA_K_PITCH];
  threadgroup MFA_IN_T v_tile[MFA_BK * MFA_V_PITCH];
#define K_TILE k_tile
#define V_TILE v_tile
  simdgroup_float8x8 q_frag[DQK_BLOCKS], do_frag[DV_BLOCKS];
  {
    device const MFA_IN_T* q_row = q + b * p.q_stride_b + row * p.q_stride_s + head * p.q_stride_h;
    device const MFA_IN_T* do_row = grad_out + b * p.do_stride_b + row * p.do_stride_s + head * p.do_stride_h;
    const bool q_unit = p.q_stride_d == 1, do_unit = p.do_stride_d == 1;
    for (int d = 0; d < DQK_BLOCKS; ++d) {
      for (int e = 0; e < 2; ++e) {
        const int col = d * 8 + at.col + e;
        q_frag[d].thread_elements()[e] =
            (row_in && col < MFA_DQK) ? float(q_unit ? q_row[col] : q_row[col * p.q_stride_d]) : 0.0f;
      }
    }
    for (int d = 0; d < DV_BLOCKS; ++d) {
      for (int e = 0; e < 2; ++e) {
        const int col = d * 8 + at.col + e;
        do_frag[d].thread_elements()[e] =
            (row_in && col < MFA_DV) ? float(do_unit ? do_row[col] : do_row[col * p.do_stride_d]) : 0.0f;
      }
    }
  }
#define Q_OPERAND(frag, d) frag = q_frag[d]
#define DO_OPERAND(frag, d) frag = do_frag[d]
#endif
  const long slot = b * p.lse_stride_b + head * p.lse_stride_h + row * p.lse_stride_s;
  const float row_lse = row_in ? safe_lse(lse, slot) : 0.0f;
  const float row_delta = row_in ? delta[slot] : 0.0f;
#if MFA_HAS_ALIBI
  const float slope = alibi_slopes[b * p.alibi_stride_b + head];
#else
  const float slope = 0.0f;
#endif

  // The keys some row of this threadgroup sees, from a block boundary.
  const long last_i = lmin(block0 + BQ, seq.seqlen_q) - 1;
  const long first_j = p.window_left >= 0 ? lmax(block0 + offset - p.window_left, 0) : 0;
  const long end_j = p.window_right >= 0 ? lmin(last_i + offset + p.window_right + 1, seq.seqlen_k) : seq.seqlen_k;
  long key0 = (first_j / MFA_BK) * MFA_BK;
  const long k_step = MFA_BK * p.k_stride_s, v_step = MFA_BK * p.v_stride_s;
  device const MFA_IN_T* k_block = k + b * p.k_stride_b + kv_head * p.k_stride_h + (seq.k_start + key0) * p.k_stride_s;
  device const MFA_IN_T* v_block = v + b * p.v_stride_b + kv_head * p.v_stride_h + (seq.k_start + key0) * p.v_stride_s;
  for (; key0 < end_j; key0 += MFA_BK, k_block += k_step, v_block += v_step) {
    const int keys_in = int(lmin(seq.seqlen_k - key0, MFA_BK));
    stage_block<MFA_IN_T, MFA_DV_PAD, MFA_DV, MFA_V_PITCH, MFA_BK, THREADS>(V_TILE, v_block, keys_in, p.v_stride_s,
                                                                        p.v_stride_d, vector_rows & 2, tid);
#if !MFA_HELD_IN_TG
    stage_block<MFA_IN_T, MFA_DQK_PAD, MFA_DQK, MFA_K_PITCH, MFA_BK, THREADS>(K_TILE, k_block, keys_in, p.k_stride_s,
                                                                          p.k_stride_d, vector_rows & 1, tid);
#endif
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // dP = dO V^T and S = Q K^T (V^T, K^T read from the tiles by swapping strides), the head dim outermost
    // so that an operand staged in threadgroup memory is read once per block.
    simdgroup_float8x8 s[KEY_FRAGMENTS], dp[KEY_FRAGMENTS];
    for (int j = 0; j < KEY_FRAGMENTS; ++j) {
      s[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      dp[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    for (int d = 0; d < DV_BLOCKS; ++d) {
      simdgroup_float8x8 dof;
      DO_OPERAND(dof, d);
      for (int j = 0; j < KEY_FRAGMENTS; ++j) {
        simdgroup_float8x8 vt;
        load_fragment(vt, V_TILE + j * 8 * MFA_V_PITCH + d * 8, 1, MFA_V_PITCH, at);
        simdgroup_multiply_accumulate(dp[j], dof, vt, dp[j]);
      }
    }
#if MFA_HELD_IN_TG
    threadgroup_barrier(mem_flags::mem_threadgroup);  // every simdgroup is done with V: K takes the tile
    stage_block<MFA_IN_T, MFA_DQK_PAD, MFA_DQK, MFA_K_PITCH, MFA_BK, THREADS>(K_TILE, k_block, keys_in, p.k_stride_s,
                                                                          p.k_stride_d, vector_rows & 1, tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
#endif
    for (int d = 0; d < DQK_BLOCKS; ++d) {
      simdgroup_float8x8 qf;
      Q_OPERAND(qf, d);
      for (int j = 0; j < KEY_FRAGMENTS; ++j) {
        simdgroup_float8x8 kt;
        load_fragment(kt, K_TILE + j * 8 * MFA_K_PITCH + d * 8, 1, MFA_K_PITCH, at);
        simdgroup_multiply_accumulate(s[j], qf, kt, s[j]);
      }
    }
    // dS * chain in place of S; invisible keys (window, sequence end, mask) give exact zeros.
    for (int j = 0; j < KEY_FRAGMENTS; ++j) {
      for (int e = 0; e < 2; ++e) {
        const int kk = j * 8 + at.col + e;
        const long jj = key0 + kk;  // the key
        float dsc = 0.0f;
        bool visible = row_in && kk < keys_in && is_visible(p, i, jj, offset);
        float bias = 0.0f;
#if MFA_MASK_KIND
        if (visible) {
          const long m_at = b * p.mask_stride_b + head * p.mask_stride_h + i * p.mask_stride_q + jj * p.mask_stride_k;
#if MFA_MASK_KIND == 1
          visible = mask[m_at] != 0;
#else
          const Stored m = read_stored(mask, m_at);
          visible = !m.neg_inf;  // a -inf entry removes the key (p = 0)
          bias = m.value;
#endif
        }
#endif
        if (visible) {
          const Prob pr = probability(s[j].thread_elements()[e], row_lse, scale, softcap, slope, bias, i + offset - jj);
          const float ds = pr.p * (dp[j].thread_elements()[e] - row_delta);
#if MFA_WANT_DMASK
          dmask[((b * p.heads_q + head) * p.seqlen_q + i) * p.seqlen_k + jj] = ds;
#endif
          dsc = ds * pr.chain;
        }
        s[j].thread_elements()[e] = dsc;
      }
    }
    // dQ += dS K.
    for (int d = 0; d < DQK_BLOCKS; ++d) {
      for (int j = 0; j < KEY_FRAGMENTS; ++j) {
        simdgroup_float8x8 kf;
        load_fragment(kf, K_TILE + j * 8 * MFA_K_PITCH + d * 8, MFA_K_PITCH, 1, at);
        simdgroup_multiply_accumulate(dq_acc[d], s[j], kf, dq_acc[d]);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the next block overwrites the tiles
  }

  if (!row_in) return;
  device MFA_IN_T* dq_row = dq + b * p.dq_stride_b + row * p.dq_stride_s + head * p.dq_stride_h;
  for (int d = 0; d < DQK_BLOCKS; ++d) {
    for (int e = 0; e < 2; ++e) {
      const int col = d * 8 + at.col + e;
      if (col < MFA_DQK) dq_row[col * p.dq_stride_d] = MFA_IN_T(dq_acc[d].thread_elements()[e]);
    }
  }
}
#undef K_TILE
#undef V_TILE
#undef Q_OPERAND
#undef DO_OPERAND

// dK, dV on 8x8 simdgroup_matrix products: a threadgroup = MFA_WM simdgroups x 8 keys of one (batch, KV
// head), the dK, dV accumulators in registers; K and V are fragments in registers up to D = 128 and,
// beyond (MFA_HELD_IN_TG), staged once in threadgroup memory (Q and dO then take turns in one tile). For
// each query head of the group and each block of MFA_BK rows that sees some of these keys, Q and dO are
// staged in threadgroup memory (with the rows' LSE and delta); S^T = K Q^T and dP^T = V dO^T are float
// fragments, P^T and dS^T chain come from them element-wise, and dV += P^T dO, dK += dS^T Q (the
// accumulator layout is the A-operand layout: P^T and dS^T never go through memory). The GQA reduction
// is the loop over the group's heads, in registers: no atomics.
#define KB (8 * MFA_WM)  // keys per threadgroup
#define ROW_FRAGMENTS (MFA_BK / 8)

[[kernel, max_total_threads_per_threadgroup(THREADS)]] void attention_backward_dkdv(
    device const MFA_IN_T* q [[buffer(0)]],
    device const MFA_IN_T* k [[buffer(1)]],
    device const MFA_IN_T* v [[buffer(2)]],
    device const MFA_IN_T* grad_out [[buffer(3)]],
    device const float* lse [[buffer(4)]],
    device const float* delta [[buffer(5)]],
    device MFA_IN_T* dk [[buffer(6)]],
    device MFA_IN_T* dv [[buffer(7)]],
    device const MFA_MASK_T* mask [[buffer(8)]],
    device const float* alibi_slopes [[buffer(9)]],
    device const MFA_CU_T* cu_seqlens_q [[buffer(10)]],
    device const MFA_CU_T* cu_seqlens_k [[buffer(11)]],
    constant BackwardParams& p [[buffer(12)]],
    constant float& scale [[buffer(13)]],
    constant float& softcap [[buffer(14)]],
    uint3 group_id [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]],
    ushort tid [[thread_index_in_threadgroup]]) {
  const long b = group_id.z, kv_head = group_id.y;
  const Sequence seq = sequence_of(p, cu_seqlens_q, cu_seqlens_k, b);
  const long block0 = long(group_id.x) * KB;
  if (block0 >= seq.seqlen_k) return;  // the whole threadgroup
  const long offset = seq.seqlen_k - seq.seqlen_q;
  const int vector_rows = int(p.vector_rows);
  threadgroup float lse_tile[MFA_BK];
  threadgroup float delta_tile[MFA_BK];

  const FragmentLane at = fragment_lane(lane);
  const long j = block0 + sg * 8 + at.row;  // this lane's key
  const bool key_in = j < seq.seqlen_k;
  const long key = seq.k_start + (key_in ? j : 0);
  simdgroup_float8x8 dk_acc[DQK_BLOCKS], dv_acc[DV_BLOCKS];
  for (int d = 0; d < DQK_BLOCKS; ++d) dk_acc[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (int d = 0; d < DV_BLOCKS; ++d) dv_acc[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
#if MFA_HELD_IN_TG
  // K and V of the threadgroup's keys, staged once (the first row block's barrier publishes them).
  threadgroup MFA_IN_T k_held[KB * MFA_K_PITCH];
  threadgroup MFA_IN_T v_held[KB * MFA_V_PITCH];
  threadgroup MFA_IN_T qdo_tile[MFA_BK * SHARED_PITCH];  // Q and dO take turns
#define Q_TILE qdo_tile
#define DO_TILE qdo_tile
  {
    const int keys_in = int(lmin(seq.seqlen_k - block0, KB));
    device const MFA_IN_T* k_block = k + b * p.k_stride_b + kv_head * p.k_stride_h + (seq.k_start + block0) * p.k_stride_s;
    device const MFA_IN_T* v_block = v + b * p.v_stride_b + kv_head * p.v_stride_h + (seq.k_start + block0) * p.v_stride_s;
    stage_block<MFA_IN_T, MFA_DQK_PAD, MFA_DQK, MFA_K_PITCH, KB, THREADS>(k_held, k_block, keys_in, p.k_stride_s,
                                                                      p.k_stride_d, vector_rows & 1, tid);
    stage_block<MFA_IN_T, MFA_DV_PAD, MFA_DV, MFA_V_PITCH, KB, THREADS>(v_held, v_block, keys_in, p.v_stride_s,
                                                                    p.v_stride_d, vector_rows & 2, tid);
  }
#define K_OPERAND(frag, d) load_fragment(frag, k_held + sg * 8 * MFA_K_PITCH + (d) * 8, MFA_K_PITCH, 1, at)
#define V_OPERAND(frag, d) load_fragment(frag, v_held + sg * 8 * MFA_V_PITCH + (d) * 8, MFA_V_PITCH, 1, at)
#else
  threadgroup MFA_IN_T q_tile[MFA_BK * MFA_K_PITCH];
  threadgroup MFA_IN_T do_tile[MFA_BK * MFA_V_PITCH];
#define Q_TILE q_tile
#define DO_TILE do_tile
  simdgroup_float8x8 k_frag[DQK_BLOCKS], v_frag[DV_BLOCKS];
  {
    device const MFA_IN_T* k_row = k + b * p.k_stride_b + key * p.k_stride_s + kv_head * p.k_stride_h;
    device const MFA_IN_T* v_row = v + b * p.v_stride_b + key * p.v_stride_s + kv_head * p.v_stride_h;
    const bool k_unit = p.k_stride_d == 1, v_unit = p.v_stride_d == 1;
    for (int d = 0; d < DQK_BLOCKS; ++d) {
      for (int e = 0; e < 2; ++e) {
        const int col = d * 8 + at.col + e;
        k_frag[d].thread_elements()[e] =
            (key_in && col < MFA_DQK) ? float(k_unit ? k_row[col] : k_row[col * p.k_stride_d]) : 0.0f;
      }
    }
    for (int d = 0; d < DV_BLOCKS; ++d) {
      for (int e = 0; e < 2; ++e) {
        const int col = d * 8 + at.col + e;
        v_frag[d].thread_elements()[e] =
            (key_in && col < MFA_DV) ? float(v_unit ? v_row[col] : v_row[col * p.v_stride_d]) : 0.0f;
      }
    }
  }
#define K_OPERAND(frag, d) frag = k_frag[d]
#define V_OPERAND(frag, d) frag = v_frag[d]
#endif

  // The rows that see some key of this block: key j is seen by rows j - offset - right .. j - offset + left.
  const long last_j = lmin(block0 + KB, seq.seqlen_k) - 1;
  const long first_i = p.window_right >= 0 ? lmax(block0 - offset - p.window_right, 0) : 0;
  const long end_i = p.window_left >= 0 ? lmin(last_j - offset + p.window_left + 1, seq.seqlen_q) : seq.seqlen_q;
  const long row0 = (first_i / MFA_BK) * MFA_BK;
  for (long g = 0; g < p.group; ++g) {  // the GQA reduction: every query head of this KV head
    const long head = kv_head * p.group + g;
#if MFA_HAS_ALIBI
    const float slope = alibi_slopes[b * p.alibi_stride_b + head];
#else
    const float slope = 0.0f;
#endif
    const long q_step = MFA_BK * p.q_stride_s, do_step = MFA_BK * p.do_stride_s;
    device const MFA_IN_T* q_block = q + b * p.q_stride_b + head * p.q_stride_h + (seq.q_start + row0) * p.q_stride_s;
    device const MFA_IN_T* do_block =
        grad_out + b * p.do_stride_b + head * p.do_stride_h + (seq.q_start + row0) * p.do_stride_s;
    for (long i0 = row0; i0 < end_i; i0 += MFA_BK, q_block += q_step, do_block += do_step) {
      const int rows_in = int(lmin(seq.seqlen_q - i0, MFA_BK));
      stage_block<MFA_IN_T, MFA_DQK_PAD, MFA_DQK, MFA_K_PITCH, MFA_BK, THREADS>(Q_TILE, q_block, rows_in, p.q_stride_s,
                                                                            p.q_stride_d, vector_rows & 4, tid);
#if !MFA_HELD_IN_TG
      stage_block<MFA_IN_T, MFA_DV_PAD, MFA_DV, MFA_V_PITCH, MFA_BK, THREADS>(DO_TILE, do_block, rows_in,
                                                                          p.do_stride_s, p.do_stride_d,
                                                                          vector_rows & 8, tid);
#endif
      if (tid < MFA_BK) {
        const long slot = b * p.lse_stride_b + head * p.lse_stride_h + (seq.q_start + i0 + tid) * p.lse_stride_s;
        lse_tile[tid] = tid < rows_in ? safe_lse(lse, slot) : 0.0f;
        delta_tile[tid] = tid < rows_in ? delta[slot] : 0.0f;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);

      // S^T = K Q^T and dP^T = V dO^T: 8 keys x MFA_BK rows per simdgroup (Q^T, dO^T read by swapped
      // strides), the head dim outermost.
      simdgroup_float8x8 st[ROW_FRAGMENTS], dpt[ROW_FRAGMENTS], pt[ROW_FRAGMENTS];
      for (int f = 0; f < ROW_FRAGMENTS; ++f) {
        st[f] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        dpt[f] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      }
      for (int d = 0; d < DQK_BLOCKS; ++d) {
        simdgroup_float8x8 kf;
        K_OPERAND(kf, d);
        for (int f = 0; f < ROW_FRAGMENTS; ++f) {
          simdgroup_float8x8 qt;
          load_fragment(qt, Q_TILE + f * 8 * MFA_K_PITCH + d * 8, 1, MFA_K_PITCH, at);
          simdgroup_multiply_accumulate(st[f], kf, qt, st[f]);
        }
      }
#if MFA_HELD_IN_TG
      threadgroup_barrier(mem_flags::mem_threadgroup);  // every simdgroup is done with Q: dO takes the tile
      stage_block<MFA_IN_T, MFA_DV_PAD, MFA_DV, MFA_V_PITCH, MFA_BK, THREADS>(DO_TILE, do_block, rows_in,
                                                                          p.do_stride_s, p.do_stride_d,
                                                                          vector_rows & 8, tid);
      threadgroup_barrier(mem_flags::mem_threadgroup);
#endif
      for (int d = 0; d < DV_BLOCKS; ++d) {
        simdgroup_float8x8 vf;
        V_OPERAND(vf, d);
        for (int f = 0; f < ROW_FRAGMENTS; ++f) {
          simdgroup_float8x8 dot_;
          load_fragment(dot_, DO_TILE + f * 8 * MFA_V_PITCH + d * 8, 1, MFA_V_PITCH, at);
          simdgroup_multiply_accumulate(dpt[f], vf, dot_, dpt[f]);
        }
      }
      // P^T and dS^T chain element-wise; invisible (row, key) pairs give exact zeros.
      for (int f = 0; f < ROW_FRAGMENTS; ++f) {
        for (int e = 0; e < 2; ++e) {
          const int r = f * 8 + at.col + e;
          const long i = i0 + r;  // the row
          float pe = 0.0f, dsc = 0.0f;
          bool visible = key_in && r < rows_in && is_visible(p, i, j, offset);
          float bias = 0.0f;
#if MFA_MASK_KIND
          if (visible) {
            const long m_at = b * p.mask_stride_b + head * p.mask_stride_h + i * p.mask_stride_q + j * p.mask_stride_k;
#if MFA_MASK_KIND == 1
            visible = mask[m_at] != 0;
#else
            const Stored m = read_stored(mask, m_at);
            visible = !m.neg_inf;  // a -inf entry removes the key (p = 0)
            bias = m.value;
#endif
          }
#endif
          if (visible) {
            const Prob pr = probability(st[f].thread_elements()[e], lse_tile[r], scale, softcap, slope, bias, i + offset - j);
            pe = pr.p;
            dsc = pr.p * (dpt[f].thread_elements()[e] - delta_tile[r]) * pr.chain;
          }
          pt[f].thread_elements()[e] = pe;
          st[f].thread_elements()[e] = dsc;
        }
      }
      // dV += P^T dO, dK += dS^T Q.
      for (int d = 0; d < DV_BLOCKS; ++d) {
        for (int f = 0; f < ROW_FRAGMENTS; ++f) {
          simdgroup_float8x8 dof;
          load_fragment(dof, DO_TILE + f * 8 * MFA_V_PITCH + d * 8, MFA_V_PITCH, 1, at);
          simdgroup_multiply_accumulate(dv_acc[d], pt[f], dof, dv_acc[d]);
        }
      }
#if MFA_HELD_IN_TG
      threadgroup_barrier(mem_flags::mem_threadgroup);  // every simdgroup is done with dO: Q again
      stage_block<MFA_IN_T, MFA_DQK_PAD, MFA_DQK, MFA_K_PITCH, MFA_BK, THREADS>(Q_TILE, q_block, rows_in, p.q_stride_s,
                                                                            p.q_stride_d, vector_rows & 4, tid);
      threadgroup_barrier(mem_flags::mem_threadgroup);
#endif
      for (int d = 0; d < DQK_BLOCKS; ++d) {
        for (int f = 0; f < ROW_FRAGMENTS; ++f) {
          simdgroup_float8x8 qf;
          load_fragment(qf, Q_TILE + f * 8 * MFA_K_PITCH + d * 8, MFA_K_PITCH, 1, at);
          simdgroup_multiply_accumulate(dk_acc[d], st[f], qf, dk_acc[d]);
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);  // the next block overwrites the tiles
    }
  }

  if (!key_in) return;
  device MFA_IN_T* dk_row = dk + b * p.dk_stride_b + key * p.dk_stride_s + kv_head * p.dk_stride_h;
  device MFA_IN_T* dv_row = dv + b * p.dv_stride_b + key * p.dv_stride_s + kv_head * p.dv_stride_h;
  for (int d = 0; d < DQK_BLOCKS; ++d) {
    for (int e = 0; e < 2; ++e) {
      const int col = d * 8 + at.col + e;
      if (col < MFA_DQK) dk_row[col * p.dk_stride_d] = MFA_IN_T(dk_acc[d].thread_elements()[e]);
    }
  }
  for (int d = 0; d < DV_BLOCKS; ++d) {
    for (int e = 0; e < 2; ++e) {
      const int col = d * 8 + at.col + e;
      if (col < MFA_DV) dv_row[col * p.dv_stride_d] = MFA_IN_T(dv_acc[d].thread_elements()[e]);
    }
  }
}
#undef Q_TILE
#undef DO_TILE
#undef K_OPERAND
#undef V_OPERAND

#else  // the lane-wise kernels (backward.MMA_MAX_DIM = 0: the baseline of the backward cost table)
[[kernel, max_total_threads_per_threadgroup(THREADS)]] void attention_backward_dq(
    device const MFA_IN_T* q [[buffer(0)]],
    device const MFA_IN_T* k [[buffer(1)]],
    device const MFA_IN_T* v [[buffer(2)]],
    device const MFA_IN_T* grad_out [[buffer(3)]],
    device const float* lse [[buffer(4)]],
    device const float* delta [[buffer(5)]],
    device MFA_IN_T* dq [[buffer(6)]],
    device float* dmask [[buffer(7)]],  // MFA_WANT_DMASK: (B, Hq, Lq, Lk) contiguous
    device const MFA_MASK_T* mask [[buffer(8)]],
    device const float* alibi_slopes [[buffer(9)]],
    device const MFA_CU_T* cu_seqlens_q [[buffer(10)]],
    device const MFA_CU_T* cu_seqlens_k [[buffer(11)]],
    constant BackwardParams& p [[buffer(12)]],
    constant float& scale [[buffer(13)]],
    constant float& softcap [[buffer(14)]],
    uint3 group_id [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  const long b = group_id.z, head = group_id.y, kv_head = head / p.group;
  const Sequence seq = sequence_of(p, cu_seqlens_q, cu_seqlens_k, b);
  const long block0 = long(group_id.x) * BLOCK;
  if (block0 >= seq.seqlen_q) return;
  const long offset = seq.seqlen_k - seq.seqlen_q;
  const long first_i = block0 + sg * MFA_R;
  const bool k_unit = p.k_stride_d == 1, v_unit = p.v_stride_d == 1;

  float qr[MFA_R][DL], dor[MFA_R][DVL], dqr[MFA_R][DL], lse_r[MFA_R], delta_r[MFA_R];
  for (int r = 0; r < MFA_R; ++r) {
    const long i = lmin(first_i + r, seq.seqlen_q - 1);  // rows past the end repeat the last (never written)
    const long row = seq.q_start + i;
    load_lane<DL, MFA_DQK>(qr[r], q + b * p.q_stride_b + row * p.q_stride_s + head * p.q_stride_h, p.q_stride_d,
                           p.q_stride_d == 1, lane);
    load_lane<DVL, MFA_DV>(dor[r], grad_out + b * p.do_stride_b + row * p.do_stride_s + head * p.do_stride_h,
                           p.do_stride_d, p.do_stride_d == 1, lane);
    const long slot = b * p.lse_stride_b + head * p.lse_stride_h + row * p.lse_stride_s;
    lse_r[r] = safe_lse(lse, slot);
    delta_r[r] = delta[slot];
    for (int t = 0; t < DL; ++t) dqr[r][t] = 0.0f;
  }
#if MFA_HAS_ALIBI
  const float slope = alibi_slopes[b * p.alibi_stride_b + head];
#else
  const float slope = 0.0f;
#endif

  // The keys some row of this threadgroup sees.
  const long last_i = lmin(block0 + BLOCK, seq.seqlen_q) - 1;
  const long first_j = p.window_left >= 0 ? lmax(block0 + offset - p.window_left, 0) : 0;
  const long end_j = p.window_right >= 0 ? lmin(last_i + offset + p.window_right + 1, seq.seqlen_k) : seq.seqlen_k;
  // Key rows by pointer steps from the (b, KV head) base: no 64-bit index arithmetic per element.
  device const MFA_IN_T* k_row = k + b * p.k_stride_b + kv_head * p.k_stride_h + (seq.k_start + first_j) * p.k_stride_s;
  device const MFA_IN_T* v_row = v + b * p.v_stride_b + kv_head * p.v_stride_h + (seq.k_start + first_j) * p.v_stride_s;
  for (long j = first_j; j < end_j; ++j, k_row += p.k_stride_s, v_row += p.v_stride_s) {
    float kr[DL], vr[DVL];
    load_lane<DL, MFA_DQK>(kr, k_row, p.k_stride_d, k_unit, lane);
    load_lane<DVL, MFA_DV>(vr, v_row, p.v_stride_d, v_unit, lane);
    for (int r = 0; r < MFA_R; ++r) {
      const long i = first_i + r;
      const float dot = lane_dot<DL>(qr[r], kr);
      const float dp = lane_dot<DVL>(dor[r], vr);
      if (i >= seq.seqlen_q || !is_visible(p, i, j, offset)) continue;  // uniform over the simdgroup
      float bias = 0.0f;
#if MFA_MASK_KIND
      const long at = b * p.mask_stride_b + head * p.mask_stride_h + i * p.mask_stride_q + j * p.mask_stride_k;
#if MFA_MASK_KIND == 1
      if (mask[at] == 0) continue;
#else
      const Stored m = read_stored(mask, at);
      if (m.neg_inf) continue;  // a -inf entry removes the key (p = 0)
      bias = m.value;
#endif
#endif
      const Prob pr = probability(dot, lse_r[r], scale, softcap, slope, bias, i + offset - j);
      const float ds = pr.p * (dp - delta_r[r]);
#if MFA_WANT_DMASK
      if (lane == 0) dmask[((b * p.heads_q + head) * p.seqlen_q + i) * p.seqlen_k + j] = ds;
#endif
      const float dsc = ds * pr.chain;
      for (int t = 0; t < DL; ++t) dqr[r][t] += dsc * kr[t];
    }
  }
  for (int r = 0; r < MFA_R; ++r) {
    const long i = first_i + r;
    if (i >= seq.seqlen_q) break;
    const long row = seq.q_start + i;
    store_lane<DL, MFA_DQK>(dq + b * p.dq_stride_b + row * p.dq_stride_s + head * p.dq_stride_h, p.dq_stride_d, dqr[r], lane);
  }
}

[[kernel, max_total_threads_per_threadgroup(THREADS)]] void attention_backward_dkdv(
    device const MFA_IN_T* q [[buffer(0)]],
    device const MFA_IN_T* k [[buffer(1)]],
    device const MFA_IN_T* v [[buffer(2)]],
    device const MFA_IN_T* grad_out [[buffer(3)]],
    device const float* lse [[buffer(4)]],
    device const float* delta [[buffer(5)]],
    device MFA_IN_T* dk [[buffer(6)]],
    device MFA_IN_T* dv [[buffer(7)]],
    device const MFA_MASK_T* mask [[buffer(8)]],
    device const float* alibi_slopes [[buffer(9)]],
    device const MFA_CU_T* cu_seqlens_q [[buffer(10)]],
    device const MFA_CU_T* cu_seqlens_k [[buffer(11)]],
    constant BackwardParams& p [[buffer(12)]],
    constant float& scale [[buffer(13)]],
    constant float& softcap [[buffer(14)]],
    uint3 group_id [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  const long b = group_id.z, kv_head = group_id.y;
  const Sequence seq = sequence_of(p, cu_seqlens_q, cu_seqlens_k, b);
  const long block0 = long(group_id.x) * BLOCK;
  if (block0 >= seq.seqlen_k) return;
  const long offset = seq.seqlen_k - seq.seqlen_q;
  const long first_j = block0 + sg * MFA_R;
  const bool q_unit = p.q_stride_d == 1, do_unit = p.do_stride_d == 1;

  float kr[MFA_R][DL], vr[MFA_R][DVL], dkr[MFA_R][DL], dvr[MFA_R][DVL];
  for (int r = 0; r < MFA_R; ++r) {
    const long key = seq.k_start + lmin(first_j + r, seq.seqlen_k - 1);
    load_lane<DL, MFA_DQK>(kr[r], k + b * p.k_stride_b + key * p.k_stride_s + kv_head * p.k_stride_h, p.k_stride_d,
                           p.k_stride_d == 1, lane);
    load_lane<DVL, MFA_DV>(vr[r], v + b * p.v_stride_b + key * p.v_stride_s + kv_head * p.v_stride_h, p.v_stride_d,
                           p.v_stride_d == 1, lane);
    for (int t = 0; t < DL; ++t) dkr[r][t] = 0.0f;
    for (int t = 0; t < DVL; ++t) dvr[r][t] = 0.0f;
  }

  // The rows that see some key of this block: key j is seen by rows j - offset - right ..
  // j - offset + left.
  const long last_j = lmin(block0 + BLOCK, seq.seqlen_k) - 1;
  const long first_i = p.window_right >= 0 ? lmax(block0 - offset - p.window_right, 0) : 0;
  const long end_i = p.window_left >= 0 ? lmin(last_j - offset + p.window_left + 1, seq.seqlen_q) : seq.seqlen_q;
  for (long g = 0; g < p.group; ++g) {  // the GQA reduction: every query head of this KV head
    const long head = kv_head * p.group + g;
#if MFA_HAS_ALIBI
    const float slope = alibi_slopes[b * p.alibi_stride_b + head];
#else
    const float slope = 0.0f;
#endif
    // Query rows by pointer steps from the (b, head) base: no 64-bit index arithmetic per element.
    device const MFA_IN_T* q_row = q + b * p.q_stride_b + head * p.q_stride_h + (seq.q_start + first_i) * p.q_stride_s;
    device const MFA_IN_T* do_row =
        grad_out + b * p.do_stride_b + head * p.do_stride_h + (seq.q_start + first_i) * p.do_stride_s;
    for (long i = first_i; i < end_i; ++i, q_row += p.q_stride_s, do_row += p.do_stride_s) {
      const long row = seq.q_start + i;
      float qv[DL], dov[DVL];
      load_lane<DL, MFA_DQK>(qv, q_row, p.q_stride_d, q_unit, lane);
      load_lane<DVL, MFA_DV>(dov, do_row, p.do_stride_d, do_unit, lane);
      const long slot = b * p.lse_stride_b + head * p.lse_stride_h + row * p.lse_stride_s;
      const float row_lse = safe_lse(lse, slot), row_delta = delta[slot];
      for (int r = 0; r < MFA_R; ++r) {
        const long j = first_j + r;
        const float dot = lane_dot<DL>(qv, kr[r]);
        const float dp = lane_dot<DVL>(dov, vr[r]);
        if (j >= seq.seqlen_k || !is_visible(p, i, j, offset)) continue;
        float bias = 0.0f;
#if MFA_MASK_KIND
        const long at = b * p.mask_stride_b + head * p.mask_stride_h + i * p.mask_stride_q + j * p.mask_stride_k;
#if MFA_MASK_KIND == 1
        if (mask[at] == 0) continue;
#else
        const Stored m = read_stored(mask, at);
        if (m.neg_inf) continue;  // a -inf entry removes the key (p = 0)
        bias = m.value;
#endif
#endif
        const Prob pr = probability(dot, row_lse, scale, softcap, slope, bias, i + offset - j);
        const float dsc = pr.p * (dp - row_delta) * pr.chain;
        for (int t = 0; t < DVL; ++t) dvr[r][t] += pr.p * dov[t];
        for (int t = 0; t < DL; ++t) dkr[r][t] += dsc * qv[t];
      }
    }
  }
  for (int r = 0; r < MFA_R; ++r) {
    const long j = first_j + r;
    if (j >= seq.seqlen_k) break;
    const long key = seq.k_start + j;
    store_lane<DL, MFA_DQK>(dk + b * p.dk_stride_b + key * p.dk_stride_s + kv_head * p.dk_stride_h, p.dk_stride_d, dkr[r], lane);
    store_lane<DVL, MFA_DV>(dv + b * p.dv_stride_b + key * p.dv_stride_s + kv_head * p.dv_stride_h, p.dv_stride_d, dvr[r], lane);
  }
}
#endif  // MFA_MMA
