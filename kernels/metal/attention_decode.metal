// Decode attention over a (possibly quantized) KV cache: the query heads of one KV head together,
// keys spread over simdgroups, head dims over lanes, fp32 online softmax in base 2.
//
// One threadgroup = MFA_WM simdgroups serving a tile of MFA_ROWS query rows of one (sequence b, KV head),
// rows ordered r = i * G + g (query position i, head g of the group): at Lq = 1 a tile is the
// whole group, so each K/V element is read (and dequantized) once for all G query heads.
// Simdgroup s takes keys start + s, start + s + MFA_WM, ...: its lanes load the key's MFA_DQK elements
// (DL per lane, dequantized in registers), one simd_sum per row gives the logit, and the row's
// running (max, sum, output) is updated in registers; the output columns live DVL per lane. At the
// end the MFA_WM simdgroups' states are merged through threadgroup memory.
//
// MFA_SPLIT = 0 (the "vector" kernel): one pass, writes out and LSE (sinks included).
// MFA_SPLIT = 1 (split-K): threadgroup x = tile * num_splits + split takes a contiguous share of the
// visible key range and writes its normalized partial output and natural-log LSE (float32);
// attention_decode_merge then combines the splits (and the sink) per row. num_splits is a runtime
// parameter chosen by the host from the shape: nothing is compiled per length.
//
// Defines: MFA_IN_T (q, out), MFA_K_T / MFA_V_T (code storage: MFA_IN_T, uchar, char), MFA_K_FMT / MFA_V_FMT (dequant.h),
// MFA_DQK, MFA_DV, MFA_ROWS, MFA_WM, MFA_HAS_SOFTCAP, MFA_HAS_ALIBI, MFA_HAS_SINKS, MFA_HAS_BATCH_IDX, MFA_SPLIT, MFA_DECODE_PARAM_COUNT.
// Launch: threads = (32 * MFA_WM * row_tiles * num_splits, Hkv, B), group_size = (32 * MFA_WM, 1, 1).
#include <metal_stdlib>
using namespace metal;
// The loader inserts the variant's MFA_ #defines here, after Apple's headers.
#include "decode_params.h"
#include "dequant.h"
#include "bounds.h"
#include "finite_math.h"

#define THREADS (32 * MFA_WM)
#define DL ((MFA_DQK + 31) / 32)  // q/k elements per lane
#define DVL ((MFA_DV + 31) / 32)  // output/v elements per lane
// Threadgroup floats shared by the q rows (at the start) and the simdgroups' outputs (the merge).
#define TG_Q (MFA_ROWS * DL * 32)
#define TG_O (MFA_WM * MFA_ROWS * DVL * 32)
#define TG_SHARED (TG_Q > TG_O ? TG_Q : TG_O)
#define PART_STRIDE (MFA_DV + 1)  // floats per split row in the split-K scratch: the row, then its LSE

constant float LOG2E_D = 1.4426950408889634f;
constant float LN2_D = 0.6931471805599453f;


// Offsets of this lane's N columns' scales within a row of scales: (c / group_size) * group stride,
// hoisted out of the key loop (the scale layout does not change per key).
template <int N>
inline void scale_offsets(thread int* at, long group_size, long group_stride, ushort lane) {
  for (int t = 0; t < N; ++t) at[t] = int(((lane * N + t) / group_size) * group_stride);
}

// Key range [first, end) that some row of query positions [i_first, i_last] can see.
struct KeyRange {
  long first, end;
};

inline KeyRange visible_range(constant DecodeParams& p, long length, long i_first, long i_last) {
  const long offset = length - p.seqlen_q;
  KeyRange range;
  range.first = p.window_left >= 0 ? lmax(0, i_first + offset - p.window_left) : 0;
  range.end = p.window_right >= 0 ? lmin(length, i_last + offset + p.window_right + 1) : length;
  range.end = lmax(range.first, range.end);
  return range;
}

// One side's row of DL (or DVL) dequantized elements for this lane: columns lane * N + t.
// `unit` (stride_d == 1, tested once per kernel): 32-bit column offsets; else 64-bit ones.
// `scale_at[t]`: the offset of column t's scale in the row's scales (computed once per kernel).
template <int N, int D, int FMT, typename T>
inline void load_row(thread float* dst, device const T* row, device const float* scale_row, long sd, bool unit,
                     thread const int* scale_at, ushort lane) {
  for (int t = 0; t < N; ++t) {
    const int c = lane * N + t;
    if (c >= D) {
      dst[t] = 0.0f;
      continue;
    }
    float x = unit ? code_value(row, c, 1, FMT) : code_value(row, c, sd, FMT);
    if (FMT != FMT_NONE) x *= scale_row[scale_at[t]];
    dst[t] = x;
  }
}

[[kernel, max_total_threads_per_threadgroup(THREADS)]] void attention_decode(
    device const MFA_IN_T* q [[buffer(0)]],
    device const MFA_K_T* k [[buffer(1)]],
    device const float* k_scales [[buffer(2)]],
    device const MFA_V_T* v [[buffer(3)]],
    device const float* v_scales [[buffer(4)]],
    device const int* seqlens [[buffer(5)]],
    device const int* batch_idx [[buffer(6)]],
    device const float* alibi_slopes [[buffer(7)]],
    device const float* sinks [[buffer(8)]],
    device MFA_IN_T* out [[buffer(9)]],
    device float* lse [[buffer(10)]],
    device float* part [[buffer(11)]],  // MFA_SPLIT: (B, Hq, Lq, splits, MFA_DV + 1): each split's row, then its LSE
    constant DecodeParams& p [[buffer(12)]],
    constant float& q_scale [[buffer(13)]],    // scale * log2(e); with softcap, scale / softcap
    constant float& cap_scale [[buffer(14)]],  // softcap * log2(e)
    uint3 group_id [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]],
    ushort tid [[thread_index_in_threadgroup]]) {
  const long b = group_id.z, kv_head = group_id.y;
  const long tile = group_id.x / p.num_splits, split = group_id.x % p.num_splits;
  const long total_rows = p.seqlen_q * p.group;
  const long row0 = tile * MFA_ROWS;
  // Lengths and rows are clamped into the cache: the host does not read them back off the CPU.
  // One device read per simdgroup (lane 0's, broadcast), not one per thread.
  const long length = clamp_index(long(simd_broadcast_first(lane == 0 ? seqlens[b] : 0)), 0, p.capacity);
#if MFA_HAS_BATCH_IDX
  const long cache_row = clamp_index(long(batch_idx[b]), 0, p.cache_rows - 1);
#else
  const long cache_row = b;
#endif
  const long offset = length - p.seqlen_q;  // bottom-right alignment: row i's diagonal is i + offset

  // This split's share of the keys the tile can see (an empty share still writes its rows).
  const KeyRange range = visible_range(p, length, row0 / p.group, (lmin(row0 + MFA_ROWS, total_rows) - 1) / p.group);
  const long share = (range.end - range.first + p.num_splits - 1) / p.num_splits;
  const long key_first = range.first + split * share;
  const long key_end = lmin(range.end, key_first + share);

  // Q rows in registers, the softmax scale folded in once.
  // Row state in 32-bit registers: each row's visible keys [lo, hi] (the window around its
  // diagonal; keys, positions and rows fit 32 bits: the host checks the cache's capacity).
  const int group = int(p.group), key_last = int(length) - 1;
  const long reach = length + p.seqlen_q;
  // The tile's q rows are read from device memory once per threadgroup (not once per simdgroup)
  // into threadgroup memory that the final merge reuses (tg_o), then into each lane's registers.
  threadgroup float tg_shared[TG_SHARED];
  for (int i = tid; i < TG_Q; i += THREADS) {
    const int r = i / (DL * 32), c = i % (DL * 32);
    const int row = int(lmin(row0 + r, total_rows - 1));  // rows past the end repeat the last (never written)
    const int pos = row / group, head = int(kv_head) * group + row % group;
    device const MFA_IN_T* q_row = q + b * p.q_stride_b + pos * p.q_stride_s + head * p.q_stride_h;
    tg_shared[i] = c < MFA_DQK ? float(q_row[c * p.q_stride_d]) * q_scale : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float qr[MFA_ROWS][DL];
  int lo[MFA_ROWS], hi[MFA_ROWS], diagonal[MFA_ROWS];
  float slope[MFA_ROWS];
  for (int r = 0; r < MFA_ROWS; ++r) {
    const int row = int(lmin(row0 + r, total_rows - 1));
    const int pos = row / group, head = int(kv_head) * group + row % group;
    diagonal[r] = pos + int(offset);
    // Windows are clamped to length + Lq, which already reaches every key from any diagonal.
    lo[r] = p.window_left < 0 ? 0 : diagonal[r] - int(lmin(p.window_left, reach));
    hi[r] = p.window_right < 0 ? key_last : diagonal[r] + int(lmin(p.window_right, reach));
    for (int t = 0; t < DL; ++t) qr[r][t] = tg_shared[r * DL * 32 + lane * DL + t];
#if MFA_HAS_ALIBI
    slope[r] = alibi_slopes[b * p.alibi_stride_b + head] * LOG2E_D;
#else
    slope[r] = 0.0f;
#endif
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);  // every q row is in registers: the merge may reuse tg_shared

  float m[MFA_ROWS], l[MFA_ROWS], o[MFA_ROWS][DVL];
  for (int r = 0; r < MFA_ROWS; ++r) {
    m[r] = LOWEST_FINITE;  // finite from the start (finite_math.h); l = 0 marks "nothing seen"
    l[r] = 0.0f;
    for (int t = 0; t < DVL; ++t) o[r][t] = 0.0f;
  }

  // Code and scale rows by pointer steps from the (cache row, KV head) base: no 64-bit index
  // arithmetic per element.
  const long key_start = key_first + sg;
  device const MFA_K_T* k_row = k + cache_row * p.k_stride_b + kv_head * p.k_stride_h + key_start * p.k_stride_s;
  device const MFA_V_T* v_row = v + cache_row * p.v_stride_b + kv_head * p.v_stride_h + key_start * p.v_stride_s;
  device const float* ks_row = k_scales + cache_row * p.ks_stride_b + kv_head * p.ks_stride_h + key_start * p.ks_stride_s;
  device const float* vs_row = v_scales + cache_row * p.vs_stride_b + kv_head * p.vs_stride_h + key_start * p.vs_stride_s;
  const long k_step = MFA_WM * p.k_stride_s, v_step = MFA_WM * p.v_stride_s;
  const long ks_step = MFA_WM * p.ks_stride_s, vs_step = MFA_WM * p.vs_stride_s;
  const bool k_unit = p.k_stride_d == 1, v_unit = p.v_stride_d == 1;
  int k_scale_at[DL], v_scale_at[DVL];
  scale_offsets<DL>(k_scale_at, p.k_group_size, p.ks_stride_g, lane);
  scale_offsets<DVL>(v_scale_at, p.v_group_size, p.vs_stride_g, lane);
  for (int key = int(key_start); key < int(key_end);
       key += MFA_WM, k_row += k_step, v_row += v_step, ks_row += ks_step, vs_row += vs_step) {
    float kr[DL], vr[DVL];
    load_row<DL, MFA_DQK, MFA_K_FMT>(kr, k_row, ks_row, p.k_stride_d, k_unit, k_scale_at, lane);
    load_row<DVL, MFA_DV, MFA_V_FMT>(vr, v_row, vs_row, p.v_stride_d, v_unit, v_scale_at, lane);
    for (int r = 0; r < MFA_ROWS; ++r) {
      float partial = 0.0f;
      for (int t = 0; t < DL; ++t) partial += qr[r][t] * kr[t];
      float x = simd_sum(partial);
#if MFA_HAS_SOFTCAP
      x = precise::tanh(x) * cap_scale;
#endif
#if MFA_HAS_ALIBI
      x -= slope[r] * fabs(float(diagonal[r] - key));
#endif
      const bool visible = key >= lo[r] && key <= hi[r];
      if (!visible) continue;  // uniform across the simdgroup: every lane has the same x and key
      // Before the first visible key l and o are 0, so the correction's value does not matter; a
      // NaN logit (max() skips NaN) still reaches l and o as NaN, as the reference says.
      const float m_new = max(m[r], x);
      const float correction = exp2_of_nonpositive(m[r] - m_new);
      const float pe = exp2_of_nonpositive(x - m_new);
      l[r] = l[r] * correction + pe;
      for (int t = 0; t < DVL; ++t) o[r][t] = o[r][t] * correction + pe * vr[t];
      m[r] = m_new;
    }
  }

  // Merge the MFA_WM simdgroups' states: every simdgroup publishes (m, l, o), then threads split
  // the (row, column) pairs.
  // Flat (simdgroup, row[, column]) arrays: tg_o holds DVL * 32 columns a row.
  threadgroup float tg_m[MFA_WM * MFA_ROWS];
  threadgroup float tg_l[MFA_WM * MFA_ROWS];
  threadgroup float* const tg_o = tg_shared;
  for (int r = 0; r < MFA_ROWS; ++r) {
    if (lane == 0) {
      tg_m[sg * MFA_ROWS + r] = m[r];
      tg_l[sg * MFA_ROWS + r] = l[r];
    }
    for (int t = 0; t < DVL; ++t) tg_o[(sg * MFA_ROWS + r) * DVL * 32 + lane * DVL + t] = o[r][t];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (int pair = tid; pair < MFA_ROWS * MFA_DV; pair += THREADS) {
    const int r = pair / MFA_DV, c = pair % MFA_DV;
    const long row = row0 + r;
    if (row >= total_rows) continue;
    const int pos = int(row) / group, head = int(kv_head) * group + int(row) % group;
    // A simdgroup that saw nothing has l = 0 and o = 0: its weight multiplies zeros.
    float best = LOWEST_FINITE;
    for (int s = 0; s < MFA_WM; ++s) best = max(best, tg_m[s * MFA_ROWS + r]);
#if MFA_HAS_SINKS && !MFA_SPLIT
    const Stored sink_logit = read_stored(sinks, head);
    const bool has_sink = !sink_logit.neg_inf;  // a -inf sink is no key at all
    const float sink = sink_logit.value * LOG2E_D;
    if (has_sink) best = max(best, sink);
#endif
    float total = 0.0f, acc = 0.0f;
    for (int s = 0; s < MFA_WM; ++s) {
      const float w = exp2_of_nonpositive(tg_m[s * MFA_ROWS + r] - best);
      total += tg_l[s * MFA_ROWS + r] * w;
      acc += tg_o[(s * MFA_ROWS + r) * DVL * 32 + c] * w;
    }
#if MFA_HAS_SINKS && !MFA_SPLIT
    if (has_sink) total += exp2_of_nonpositive(sink - best);
#endif
    // A row that saw nothing writes 0 and LSE -inf by its bits (compared with 0 so a NaN propagates).
    const float value = total == 0.0f ? 0.0f : acc / total;
    const float row_lse = (best + log2(total)) * LN2_D;
#if MFA_SPLIT
    const long slot = ((b * p.heads_q + head) * p.seqlen_q + pos) * p.num_splits + split;
    part[slot * PART_STRIDE + c] = value;
    if (c == 0) store_or_neg_inf(part + MFA_DV, slot * PART_STRIDE, total != 0.0f, row_lse);
#else
    out[b * p.o_stride_b + pos * p.o_stride_s + head * p.o_stride_h + c * p.o_stride_d] = MFA_IN_T(value);
    if (c == 0) {
      store_or_neg_inf(lse, b * p.lse_stride_b + head * p.lse_stride_h + pos * p.lse_stride_s,
                       total != 0.0f, row_lse);
    }
#endif
  }
}

// Combine the splits of one (sequence, query head, query row) by their log-sum-exps, with the
// sink as one more term of the denominator. One simdgroup per row: lanes stride over the splits
// for the maximum and over the columns for the output.
// Launch: threads = (32 * Lq, Hq, B), group_size = (32, 1, 1).
[[kernel, max_total_threads_per_threadgroup(32)]] void attention_decode_merge(
    device const float* part [[buffer(0)]],  // (B, Hq, Lq, splits, MFA_DV + 1), as attention_decode wrote it
    device const float* sinks [[buffer(1)]],
    device MFA_IN_T* out [[buffer(2)]],
    device float* lse [[buffer(3)]],
    constant DecodeParams& p [[buffer(4)]],
    uint3 group_id [[threadgroup_position_in_grid]],
    ushort lane [[thread_index_in_simdgroup]]) {
  const long b = group_id.z, head = group_id.y, row = group_id.x;
  const long slot0 = ((b * p.heads_q + head) * p.seqlen_q + row) * p.num_splits;
  device const float* part_lse = part + MFA_DV;  // split s's LSE: part_lse[(slot0 + s) * PART_STRIDE]
  // An empty split wrote LSE -inf (its bits are tested, never its value) and takes no part.
  float best = LOWEST_FINITE;
  for (long s = lane; s < p.num_splits; s += 32) {
    const Stored x = read_stored(part_lse, (slot0 + s) * PART_STRIDE);
    if (!x.neg_inf) best = max(best, x.value);
  }
  best = simd_max(best);
#if MFA_HAS_SINKS
  const Stored sink_logit = read_stored(sinks, head);
  const bool has_sink = !sink_logit.neg_inf;
  const float sink = sink_logit.value;
  if (has_sink) best = max(best, sink);
#endif
  float total = 0.0f;
  for (long s = lane; s < p.num_splits; s += 32) {
    const Stored x = read_stored(part_lse, (slot0 + s) * PART_STRIDE);
    total += x.neg_inf ? 0.0f : exp2_of_nonpositive((x.value - best) * LOG2E_D);
  }
  total = simd_sum(total);
#if MFA_HAS_SINKS
  if (has_sink) total += exp2_of_nonpositive((sink - best) * LOG2E_D);
#endif
  // Lane s keeps split s's weight (-1: an empty split); the column loop takes it by shuffle rather
  // than every lane reading every split's LSE again (splits past 32 are read directly).
  float lane_weight = -1.0f;
  if (lane < p.num_splits) {
    const Stored x = read_stored(part_lse, (slot0 + lane) * PART_STRIDE);
    if (!x.neg_inf) lane_weight = exp2_of_nonpositive((x.value - best) * LOG2E_D);
  }
  device MFA_IN_T* out_row = out + b * p.o_stride_b + row * p.o_stride_s + head * p.o_stride_h;
  // Every lane runs every pass of the column loop (columns past MFA_DV only skip the read and the store):
  // simd_shuffle reads the source lane's value, undefined when that lane is inactive, so a pass that only
  // some lanes ran (MFA_DV not a multiple of 32: lane 0 alone at D = 33) took other splits' weights from
  // lanes that were not there.
  for (int c0 = 0; c0 < MFA_DV; c0 += 32) {
    const int c = c0 + lane;
    const bool column = c < MFA_DV;
    float acc = 0.0f;
    for (long s = 0; s < p.num_splits; ++s) {
      float w = -1.0f;
      if (s < 32) {
        w = simd_shuffle(lane_weight, ushort(s));
      } else {
        const Stored x = read_stored(part_lse, (slot0 + s) * PART_STRIDE);
        if (!x.neg_inf) w = exp2_of_nonpositive((x.value - best) * LOG2E_D);
      }
      if (column && w != -1.0f) acc += w * part[(slot0 + s) * PART_STRIDE + c];
    }
    if (column) out_row[c * p.o_stride_d] = MFA_IN_T(total == 0.0f ? 0.0f : acc / total);
  }
  if (lane == 0) {
    store_or_neg_inf(lse, b * p.lse_stride_b + head * p.lse_stride_h + row * p.lse_stride_s, total != 0.0f,
                     best + log(total));
  }
}
