// Reference kernels for the emulator's tests.
//
// matmul_<T>: C[M,N] = A[M,K] B[K,N] (row-major, contiguous) with 8x8 simdgroup_matrix MMAs and
// float accumulation. A threadgroup computes a 32x32 tile of C with 4 simd-groups (2x2, each a
// 16x16 block of 2x2 fragments); A and B tiles of depth 16 are staged in threadgroup memory,
// zero-padded at the edges. Launch: threads = (128 * ceil(N/32), ceil(M/32)), group = (128, 1).
//
// row_sums: out[r] = sum of x[r, :] (float) by a tree reduction in threadgroup memory; one
// threadgroup of 256 threads per row. Launch: threads = 256 * rows, group_size = 256.
#include <metal_stdlib>
using namespace metal;

#define TILE 32
#define DEPTH 16

template <typename T>
kernel void matmul(device const T* a [[buffer(0)]], device const T* b [[buffer(1)]], device T* c [[buffer(2)]],
                   constant uint3& mnk [[buffer(3)]], uint2 tg [[threadgroup_position_in_grid]],
                   uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]],
                   uint tid [[thread_index_in_threadgroup]]) {
  threadgroup T a_tile[TILE * DEPTH];
  threadgroup T b_tile[DEPTH * TILE];
  const uint m = mnk.x, n = mnk.y, k = mnk.z;
  const uint row0 = tg.y * TILE, col0 = tg.x * TILE;
  const uint sg_row = (sg / 2) * 16, sg_col = (sg % 2) * 16;

  simdgroup_matrix<float, 8, 8> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

  for (uint k0 = 0; k0 < k; k0 += DEPTH) {
    for (uint i = tid; i < TILE * DEPTH; i += 128) {
      uint r = row0 + i / DEPTH, kk = k0 + i % DEPTH;
      a_tile[i] = (r < m && kk < k) ? a[r * k + kk] : T(0);
      uint kb = k0 + i / TILE, cc = col0 + i % TILE;
      b_tile[i] = (kb < k && cc < n) ? b[kb * n + cc] : T(0);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint kk = 0; kk < DEPTH; kk += 8) {
      simdgroup_matrix<T, 8, 8> af[2], bf[2];
      for (int i = 0; i < 2; ++i) simdgroup_load(af[i], a_tile, DEPTH, ulong2(kk, sg_row + i * 8));
      for (int j = 0; j < 2; ++j) simdgroup_load(bf[j], b_tile, TILE, ulong2(sg_col + j * 8, kk));
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) simdgroup_multiply_accumulate(acc[i][j], af[i], bf[j], acc[i][j]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  // Each lane writes its two elements of each fragment (Apple's lane layout), with bounds.
  const uint fr = ((lane / 4) & 4) + (lane / 2) % 4, fc = ((lane / 4) & 2) * 2 + (lane % 2) * 2;
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      uint r = row0 + sg_row + i * 8 + fr;
      for (uint e = 0; e < 2; ++e) {
        uint cc = col0 + sg_col + j * 8 + fc + e;
        if (r < m && cc < n) c[r * n + cc] = T(acc[i][j].thread_elements()[e]);
      }
    }
  }
}

template [[host_name("matmul_float")]] [[kernel]] void matmul<float>(device const float*, device const float*,
    device float*, constant uint3&, uint2, uint, uint, uint);
template [[host_name("matmul_half")]] [[kernel]] void matmul<half>(device const half*, device const half*,
    device half*, constant uint3&, uint2, uint, uint, uint);
template [[host_name("matmul_bfloat")]] [[kernel]] decltype(matmul<bfloat>) matmul<bfloat>;

kernel void row_sums(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                     constant uint& cols [[buffer(2)]], uint row [[threadgroup_position_in_grid]],
                     uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float partial[256];
  float s = 0.0f;
  for (uint c = tid; c < cols; c += 256) s += x[row * cols + c];
  partial[tid] = s;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint stride = 128; stride > 0; stride /= 2) {
    if (tid < stride) partial[tid] += partial[tid + stride];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (tid == 0) out[row] = partial[0];
}
