// Appending new tokens to a KV cache, quantizing on write (mfa_hf/quant.py's encodings).
//
// One simdgroup per (sequence b, new token t, KV head): the token goes to cache row
// batch_idx[b] (or b) at position seqlens[b] + t. Per-token scales (MFA_PER_TOKEN = 1) are the absmax
// of each group of GROUP elements divided by the format's largest code (1 for an all-zero group, NaN for
// a group holding NaN or inf),
// written beside the codes; static scales (per head or channel) are read. Lanes stride over
// elements (nf4: over bytes, each lane packing element 2c in the low nibble, 2c + 1 in the high).
//
// Defines: MFA_IN_T, MFA_FMT (dequant.h), MFA_CODE_T (MFA_IN_T, uchar or char), MFA_CODE_MAX (the format's largest
// code, a float literal, from mfa_hf/kv_formats.py), MFA_D, MFA_PER_TOKEN, MFA_HAS_BATCH_IDX,
// MFA_APPEND_PARAM_COUNT. Launch: threads = (32 * Lnew, Hkv, B), group_size = (32, 1, 1).
#include <metal_stdlib>
using namespace metal;
// The loader inserts the variant's MFA_ #defines here, after Apple's headers.
#include "bounds.h"
#include "quantize.h"

struct AppendParams {
  long new_stride_b, new_stride_s, new_stride_h, new_stride_d;
  long c_stride_b, c_stride_s, c_stride_h, c_stride_d;
  long s_stride_b, s_stride_s, s_stride_h, s_stride_g;
  long group_size;
  long capacity, cache_rows;  // lengths and rows are clamped into the cache (values are not checked on the host)
};
#ifdef MFA_APPEND_PARAM_COUNT
static_assert(sizeof(AppendParams) == MFA_APPEND_PARAM_COUNT * sizeof(long), "AppendParams does not match the host");
#endif

// A group's per-token scale, as float bits: its absmax over the format's largest code, 1 for an all-zero group, and
// NaN when an element is NaN or infinite, so that the whole group dequantizes to NaN, as mfa_hf/quant.py's
// absmax_scales does (int8 and nf4 have no NaN code). Under fast math the compiler may assume no float is NaN or
// inf: the elements are tested on their stored bits, only finite values reach float arithmetic, and the NaN is
// chosen and stored as integer bits (a float select that yields NaN may be folded to its other arm).
inline uint group_scale_bits(device const MFA_IN_T* row, long stride_d, long group, long size) {
  float amax = 0.0f;
  bool nonfinite = false;
  for (long c = group * size; c < (group + 1) * size; ++c) {
    const Stored element = read_stored(row, c * stride_d);
    nonfinite = nonfinite || element.nonfinite;
    amax = max(amax, fabs(element.nonfinite ? 0.0f : element.value));
  }
  const float scale = amax > 0.0f ? amax / MFA_CODE_MAX : 1.0f;
  return nonfinite ? 0x7FC00000u : as_type<uint>(scale);
}

[[kernel, max_total_threads_per_threadgroup(32)]] void kvcache_append(
    device const MFA_IN_T* new_tokens [[buffer(0)]],
    device MFA_CODE_T* codes [[buffer(1)]],
    device float* scales [[buffer(2)]],
    device const int* seqlens [[buffer(3)]],
    device const int* batch_idx [[buffer(4)]],
    constant AppendParams& p [[buffer(5)]],
    uint3 group_id [[threadgroup_position_in_grid]],
    ushort lane [[thread_index_in_simdgroup]]) {
  const long b = group_id.z, head = group_id.y, t = group_id.x;
  // Off the CPU the host does not read lengths or rows back (mfa_hf.problem.values_checked): a bad
  // value overwrites a slot of the cache, as the torch append does, never memory beyond it.
#if MFA_HAS_BATCH_IDX
  const long row = clamp_index(long(batch_idx[b]), 0, p.cache_rows - 1);
#else
  const long row = b;
#endif
  const long position = clamp_index(long(seqlens[b]) + t, 0, p.capacity - 1);
  device const MFA_IN_T* src = new_tokens + b * p.new_stride_b + t * p.new_stride_s + head * p.new_stride_h;
  device MFA_CODE_T* dst = codes + row * p.c_stride_b + position * p.c_stride_s + head * p.c_stride_h;
  device float* scale_row = scales + row * p.s_stride_b + position * p.s_stride_s + head * p.s_stride_h;
#if MFA_FMT == FMT_NONE
  for (int c = lane; c < MFA_D; c += 32) dst[c * p.c_stride_d] = src[c * p.new_stride_d];
#else
#if MFA_PER_TOKEN
  for (long g = lane; g < MFA_D / p.group_size; g += 32) {
    ((device uint*)scale_row)[g * p.s_stride_g] = group_scale_bits(src, p.new_stride_d, g, p.group_size);
  }
  simdgroup_barrier(mem_flags::mem_device);  // the scales just written are read back below
#endif
#if MFA_FMT == FMT_NF4
  for (int c2 = lane; c2 < MFA_D / 2; c2 += 32) {
    uchar packed = 0;
    for (int e = 0; e < 2; ++e) {
      const int c = 2 * c2 + e;
      const float x = float(src[c * p.new_stride_d]) / scale_row[(c / p.group_size) * p.s_stride_g];
      packed |= nf4_index(clamp(x, -1.0f, 1.0f)) << (4 * e);
    }
    dst[c2 * p.c_stride_d] = packed;
  }
#else
  for (int c = lane; c < MFA_D; c += 32) {
    const Stored element = read_stored(src, c * p.new_stride_d);
    const float x = element.value / scale_row[(c / p.group_size) * p.s_stride_g];
    const float limit = MFA_CODE_MAX;
#if MFA_FMT == FMT_INT8
    dst[c * p.c_stride_d] = char(clamp(rint(x), -limit, limit));
#elif MFA_FMT == FMT_FP8_E4M3
    dst[c * p.c_stride_d] = element.nan ? fp8_nan(element.negative) : fp8_from_float(clamp(x, -limit, limit), 3, 7, -6);
#else
    dst[c * p.c_stride_d] = element.nan ? fp8_nan(element.negative) : fp8_from_float(clamp(x, -limit, limit), 2, 15, -14);
#endif
  }
#endif
#endif
}
