// The launch parameters of attention_forward, shared by host and device.
//
// The host (kernels/metal/forward.py) passes them as one list of Python ints, which both
// torch.mps.compile_shader and the emulator bind as an array of int64: so every field is a
// `long`, in exactly the order of PARAM_FIELDS in forward.py. The loader checks that the names
// below match that tuple, and the kernel checks the size the host announced (MFA_ATTENTION_PARAM_COUNT).
#pragma once

struct AttentionParams {
  // Element strides (0 for broadcast dimensions). Dense tensors: (batch, sequence, head, dim).
  // Packed (varlen) tensors have no batch dimension: their batch stride is 0 and the sequence
  // offset comes from cu_seqlens.
  long q_stride_b, q_stride_s, q_stride_h, q_stride_d;
  long k_stride_b, k_stride_s, k_stride_h, k_stride_d;
  long v_stride_b, v_stride_s, v_stride_h, v_stride_d;
  long o_stride_b, o_stride_s, o_stride_h, o_stride_d;
  long lse_stride_b, lse_stride_h, lse_stride_s;
  long mask_stride_b, mask_stride_h, mask_stride_q, mask_stride_k;
  long alibi_stride_b;  // 0 for slopes of shape (Hq,), Hq for (B, Hq)
  long seqlen_q, seqlen_k;  // dense problems; varlen reads each sequence's from cu_seqlens
  long group;  // query heads per KV head (GQA/MQA): KV head = query head / group
  long window_left, window_right;  // -1 = unbounded; causal arrives as window_right = 0
  long total_q, total_k;  // rows of packed (varlen) q and k: cu_seqlens values are clamped into them
  // Bits 1 (q), 2 (k), 4 (v): that tensor's rows are staged with vector loads and 32-bit offsets
  // (binding.vector_rows: stride_d == 1, 4-element aligned rows, a block's offsets fit 32 bits).
  long vector_rows;
};

#ifdef MFA_ATTENTION_PARAM_COUNT
static_assert(sizeof(AttentionParams) == MFA_ATTENTION_PARAM_COUNT * sizeof(long),
              "AttentionParams does not match the host's PARAM_FIELDS");
#endif
