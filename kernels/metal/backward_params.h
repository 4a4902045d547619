// The launch parameters of the backward kernels (attention_backward.metal), shared by host and
// device: one list of Python ints bound as int64, every field a `long`, in the order of
// BACKWARD_PARAM_FIELDS in backward.py (checked at import; the kernels static_assert the size).
#pragma once

struct BackwardParams {
  // Element strides as (batch, sequence, head, dim); packed (varlen) tensors have batch stride 0.
  long q_stride_b, q_stride_s, q_stride_h, q_stride_d;
  long k_stride_b, k_stride_s, k_stride_h, k_stride_d;
  long v_stride_b, v_stride_s, v_stride_h, v_stride_d;
  long o_stride_b, o_stride_s, o_stride_h, o_stride_d;
  long do_stride_b, do_stride_s, do_stride_h, do_stride_d;
  long dq_stride_b, dq_stride_s, dq_stride_h, dq_stride_d;
  long dk_stride_b, dk_stride_s, dk_stride_h, dk_stride_d;
  long dv_stride_b, dv_stride_s, dv_stride_h, dv_stride_d;
  long lse_stride_b, lse_stride_h, lse_stride_s;  // also delta's and dLSE's (same shape, contiguous)
  long mask_stride_b, mask_stride_h, mask_stride_q, mask_stride_k;
  long alibi_stride_b;
  long seqlen_q, seqlen_k;  // dense; varlen reads each sequence's from cu_seqlens
  long heads_q, group;
  long window_left, window_right;  // -1 = unbounded; causal arrives as window_right = 0
  long total_q, total_k;  // rows of packed (varlen) q and k: cu_seqlens values are clamped into them
  long vector_rows;  // staging.h's vector path per tensor: bit 0 k, 1 v (dQ), 2 q, 3 dO (dK/dV) (binding.vector_row_bits)
};

#ifdef MFA_BACKWARD_PARAM_COUNT
static_assert(sizeof(BackwardParams) == MFA_BACKWARD_PARAM_COUNT * sizeof(long),
              "BackwardParams does not match the host's BACKWARD_PARAM_FIELDS");
#endif
