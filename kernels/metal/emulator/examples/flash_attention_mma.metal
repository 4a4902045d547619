// Reference workload for the emulator: flash-attention forward with 8x8 simdgroup_matrix MMAs.
// Layout (B, H, N, D) contiguous, half in/out, float accumulation, online softmax.
// A threadgroup = 4 simd-groups x 8 query rows; K/V tiles of 32 keys staged in threadgroup
// memory. Launch: threads = (128 * ceil(N / 32), B * H), group_size = (128, 1).
// Defines: HEAD_DIM (default 64), CAUSAL (default 0).
#include <metal_stdlib>
using namespace metal;

#ifndef HEAD_DIM
#define HEAD_DIM 64
#endif
#ifndef CAUSAL
#define CAUSAL 0
#endif
#define ROWS 32
#define KEYS 32
#define DB (HEAD_DIM / 8)

kernel void flash_attention_mma(device const half* q [[buffer(0)]],
                                device const half* k [[buffer(1)]],
                                device const half* v [[buffer(2)]],
                                device half* out [[buffer(3)]],
                                constant uint& n [[buffer(4)]],
                                constant float& scale [[buffer(5)]],
                                uint2 tgid [[threadgroup_position_in_grid]],
                                uint sg [[simdgroup_index_in_threadgroup]],
                                uint lane [[thread_index_in_simdgroup]],
                                uint tid [[thread_index_in_threadgroup]]) {
  threadgroup half q_tile[ROWS * HEAD_DIM];
  threadgroup half k_tile[KEYS * HEAD_DIM];
  threadgroup half v_tile[KEYS * HEAD_DIM];
  const ulong head = ulong(tgid.y) * n * HEAD_DIM;
  const uint row0 = tgid.x * ROWS;

  // Stage this threadgroup's 32 query rows (zero past the end).
  for (uint i = tid; i < ROWS * HEAD_DIM; i += 128) {
    uint r = row0 + i / HEAD_DIM;
    q_tile[i] = r < n ? q[head + ulong(r) * HEAD_DIM + i % HEAD_DIM] : half(0);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_half8x8 qf[DB];
  for (int d = 0; d < DB; ++d) simdgroup_load(qf[d], q_tile, HEAD_DIM, ulong2(d * 8, sg * 8));

  // Lane layout of an 8x8 fragment: this lane's row and first column.
  const uint my_row = ((lane / 4) & 4) + (lane / 2) % 4;
  const uint my_col = ((lane / 4) & 2) * 2 + (lane % 2) * 2;
  const uint q_row = row0 + sg * 8 + my_row;

  simdgroup_float8x8 o[DB];
  for (int d = 0; d < DB; ++d) o[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  float m = -INFINITY, l = 0.0f;

  uint key_end = CAUSAL ? min(n, row0 + ROWS) : n;
  for (uint key0 = 0; key0 < key_end; key0 += KEYS) {
    for (uint i = tid; i < KEYS * HEAD_DIM; i += 128) {
      uint r = key0 + i / HEAD_DIM;
      ulong at = head + ulong(r) * HEAD_DIM + i % HEAD_DIM;
      k_tile[i] = r < n ? k[at] : half(0);
      v_tile[i] = r < n ? v[at] : half(0);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // S = Q K^T for 8 rows x 32 keys: 4 fragments, K read transposed from the tile.
    simdgroup_float8x8 s[KEYS / 8];
    for (int j = 0; j < KEYS / 8; ++j) {
      s[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      for (int d = 0; d < DB; ++d) {
        simdgroup_half8x8 kt;
        simdgroup_load(kt, k_tile, HEAD_DIM, ulong2(d * 8, j * 8), true);
        simdgroup_multiply_accumulate(s[j], qf[d], kt, s[j]);
      }
    }

    // Online softmax on this lane's two elements per fragment; rows are shared by lanes that
    // differ in bits 0 and 3, hence the xor-1 and xor-8 shuffles.
    float tile_max = -INFINITY;
    for (int j = 0; j < KEYS / 8; ++j) {
      for (int e = 0; e < 2; ++e) {
        uint key = key0 + j * 8 + my_col + e;
        bool visible = key < n && (!CAUSAL || key <= q_row);
        float x = visible ? s[j].thread_elements()[e] * scale : -INFINITY;
        s[j].thread_elements()[e] = x;
        tile_max = max(tile_max, x);
      }
    }
    tile_max = max(tile_max, simd_shuffle_xor(tile_max, 1));
    tile_max = max(tile_max, simd_shuffle_xor(tile_max, 8));
    float m_new = max(m, tile_max);
    float correction = m_new == -INFINITY ? 1.0f : exp(m - m_new);
    float row_sum = 0.0f;
    simdgroup_half8x8 p[KEYS / 8];
    for (int j = 0; j < KEYS / 8; ++j) {
      float2 e2 = s[j].thread_elements();
      float2 pe = m_new == -INFINITY ? float2(0.0f) : exp(e2 - m_new);
      row_sum += pe.x + pe.y;
      p[j].thread_elements() = half2(pe);
    }
    row_sum += simd_shuffle_xor(row_sum, 1);
    row_sum += simd_shuffle_xor(row_sum, 8);
    l = l * correction + row_sum;
    m = m_new;

    // O = O * correction + P V.
    for (int d = 0; d < DB; ++d) {
      o[d].thread_elements() *= correction;
      for (int j = 0; j < KEYS / 8; ++j) {
        simdgroup_half8x8 vf;
        simdgroup_load(vf, v_tile, HEAD_DIM, ulong2(d * 8, j * 8));
        simdgroup_multiply_accumulate(o[d], p[j], vf, o[d]);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the next tile overwrites k_tile/v_tile
  }

  if (q_row < n) {
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int d = 0; d < DB; ++d) {
      float2 e2 = o[d].thread_elements() * inv;
      ulong at = head + ulong(q_row) * HEAD_DIM + d * 8 + my_col;
      out[at] = half(e2.x);
      out[at + 1] = half(e2.y);
    }
  }
}
