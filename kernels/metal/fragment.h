// 8x8 simdgroup_matrix fragments: where each lane's two elements sit, and element-wise loads.
//
// Apple's layout (the same for every 8x8 operand and accumulator): lane l holds row
// ((l / 4) & 4) + (l / 2) % 4 and columns ((l / 4) & 2) * 2 + (l % 2) * 2 and that + 1.
// The four lanes of one row differ in lane bits 0 and 3, so a row reduction is two xor
// shuffles (1 and 8).
//
// Fragments are loaded element by element, converting the storage type to float: every product
// then runs on float fragments (fp32 accumulation, and a bf16/half input is converted exactly),
// and a tile can be read transposed or through any stride without a second copy.
#pragma once
#include <metal_stdlib>
using namespace metal;

struct FragmentLane {
  ushort row;  // this lane's row in every 8x8 fragment
  ushort col;  // its first column (the second is col + 1)
};

inline FragmentLane fragment_lane(ushort lane) {
  FragmentLane at;
  at.row = ((lane / 4) & 4) + (lane / 2) % 4;
  at.col = ((lane / 4) & 2) * 2 + (lane % 2) * 2;
  return at;
}

// Fragment element (r, c) = tile[r * row_stride + c * col_stride], threadgroup memory.
template <typename T>
inline void load_fragment(thread simdgroup_float8x8& frag, const threadgroup T* tile, int row_stride,
                          int col_stride, FragmentLane at) {
  const threadgroup T* p = tile + at.row * row_stride + at.col * col_stride;
  frag.thread_elements()[0] = float(p[0]);
  frag.thread_elements()[1] = float(p[col_stride]);
}

inline float row_max(float x) {
  x = max(x, simd_shuffle_xor(x, 1));
  return max(x, simd_shuffle_xor(x, 8));
}

inline float row_sum(float x) {
  x += simd_shuffle_xor(x, 1);
  return x + simd_shuffle_xor(x, 8);
}
