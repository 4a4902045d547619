// Staging rows of a (sequence, dim) device matrix into a threadgroup tile, zero past the
// sequence end and past the real head dim (so padded products add exact zeros).
//
// Two paths, chosen per launch by a flag the host computes from shapes, strides and storage
// offsets (binding.vector_rows), so the branch is uniform:
//   stage_rows_vector  stride_d == 1, every row start 4-element aligned, and a block's row offsets
//                      fit 32 bits: each thread moves 4 consecutive columns with one vector load,
//                      from a block base pointer with 32-bit offsets (no 64-bit arithmetic per element);
//   stage_rows_strided any strides (broadcast, transposed, unaligned views): 64-bit offsets per element.
#pragma once
#include <metal_stdlib>
using namespace metal;
#include "bounds.h"

// `block` points at the block's first row; `rows` of them are real (the rest read as zero).
template <typename T, int PAD, int REAL, int PITCH, int ROWS, int THREADS>
inline void stage_rows_vector(threadgroup T* tile, device const T* block, int rows, int row_stride, ushort tid) {
  constexpr int CHUNKS = PAD / 4;  // PAD is a multiple of 8
  for (int i = tid; i < ROWS * CHUNKS; i += THREADS) {
    const int r = i / CHUNKS, c = (i % CHUNKS) * 4;
    threadgroup T* dst = tile + r * PITCH + c;
    device const T* src = block + r * row_stride + c;
    if (r < rows && c + 4 <= REAL) {
      const vec<T, 4> x = *reinterpret_cast<device const vec<T, 4>*>(src);
      dst[0] = x[0];
      dst[1] = x[1];
      dst[2] = x[2];
      dst[3] = x[3];
    } else {
      for (int e = 0; e < 4; ++e) dst[e] = (r < rows && c + e < REAL) ? src[e] : T(0.0f);
    }
  }
}

template <typename T, int PAD, int REAL, int PITCH, int ROWS, int THREADS>
inline void stage_rows_strided(threadgroup T* tile, device const T* block, int rows, long row_stride,
                               long col_stride, ushort tid) {
  for (int i = tid; i < ROWS * PAD; i += THREADS) {
    const int r = i / PAD, c = i % PAD;
    tile[r * PITCH + c] = (r < rows && c < REAL) ? block[r * row_stride + c * col_stride] : T(0.0f);
  }
}

// The ROWS rows from `block` (its first row), `rows` of them real (the rest read as zero). A caller
// that walks blocks advances `block` by a pointer increment: no 64-bit row arithmetic per block.
template <typename T, int PAD, int REAL, int PITCH, int ROWS, int THREADS>
inline void stage_block(threadgroup T* tile, device const T* block, int rows, long row_stride, long col_stride,
                        bool vector, ushort tid) {
  if (vector) {
    stage_rows_vector<T, PAD, REAL, PITCH, ROWS, THREADS>(tile, block, rows, int(row_stride), tid);
  } else {
    stage_rows_strided<T, PAD, REAL, PITCH, ROWS, THREADS>(tile, block, rows, row_stride, col_stride, tid);
  }
}
