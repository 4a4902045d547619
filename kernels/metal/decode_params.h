// The launch parameters of attention_decode and attention_decode_merge, shared by host and device.
//
// Passed as one list of Python ints (bound as int64 by both runtimes), so every field is a `long`,
// in exactly the order of DECODE_PARAM_FIELDS in decode.py (checked at import); the kernels
// static_assert the size the host announces (MFA_DECODE_PARAM_COUNT).
#pragma once

struct DecodeParams {
  long q_stride_b, q_stride_s, q_stride_h, q_stride_d;
  // K/V codes (or the plain cache) as (cache row, position, KV head, storage column).
  long k_stride_b, k_stride_s, k_stride_h, k_stride_d;
  long v_stride_b, v_stride_s, v_stride_h, v_stride_d;
  // Scales as (cache row, position, KV head, group); 0 along broadcast dims (static scales).
  long ks_stride_b, ks_stride_s, ks_stride_h, ks_stride_g;
  long vs_stride_b, vs_stride_s, vs_stride_h, vs_stride_g;
  long o_stride_b, o_stride_s, o_stride_h, o_stride_d;
  long lse_stride_b, lse_stride_h, lse_stride_s;
  long alibi_stride_b;  // 0 for slopes of shape (Hq,), Hq for (B, Hq)
  long seqlen_q;  // query rows per sequence (Lq)
  long heads_q;
  long group;  // query heads per KV head
  long window_left, window_right;  // -1 = unbounded; causal arrives as window_right = 0
  long num_splits;  // key-range splits per (sequence, KV head, row tile); 1 = single pass
  long k_group_size, v_group_size;  // elements sharing one scale along D
  long capacity, cache_rows;  // the cache's (rows, positions): lengths and rows are clamped into them
};

#ifdef MFA_DECODE_PARAM_COUNT
static_assert(sizeof(DecodeParams) == MFA_DECODE_PARAM_COUNT * sizeof(long),
              "DecodeParams does not match the host's DECODE_PARAM_FIELDS");
#endif
