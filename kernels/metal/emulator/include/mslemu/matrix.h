// simdgroup_matrix<T,8,8>: each of the 32 lanes owns two adjacent elements of one row, in
// Apple's layout (as used by MLX's MMA fragments): lane l holds row (l/4 & 4) + (l/2) % 4,
// columns (l/4 & 2) * 2 + (l % 2) * 2 and the next one. Kernels that read thread_elements()
// depend on this layout, so it must be exact. Loads and stores are per lane; the product is a
// collective over all 32 lanes computed with float FMAs in k order.
#pragma once
#include "simd.h"

namespace mslemu {
struct LaneCoord { int row; int col; };
MSLEMU_INLINE LaneCoord lane_coord(uint32_t lane) {
  int q = int(lane) / 4;
  return LaneCoord{(q & 4) + (int(lane) / 2) % 4, (q & 2) * 2 + (int(lane) % 2) * 2};
}
}  // namespace mslemu

namespace metal {
template <class T, int R, int C> struct simdgroup_matrix {  // all-caps names, as in Apple's headers
  static_assert(R == 8 && C == 8, "the emulator supports 8x8 simdgroup matrices only");
  static_assert(mslemu::is_float_v<T>, "simdgroup_matrix holds float, half or bfloat");
  // Uninitialised contents are undefined in Metal; NaN makes a forgotten initialisation visible.
  vec<T, 2> elements = vec<T, 2>(T(__builtin_nanf("")));
  simdgroup_matrix() = default;
  // Metal's scalar constructor builds a diagonal matrix.
  explicit simdgroup_matrix(T diagonal) {
    auto c = mslemu::lane_coord(mslemu_lane());
    for (int j = 0; j < 2; ++j) elements[j] = c.row == c.col + j ? diagonal : T(0);
  }
  MSLEMU_INLINE thread vec<T, 2>& thread_elements() { return elements; }
  MSLEMU_INLINE const vec<T, 2>& thread_elements() const { return elements; }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
#ifdef __HAVE_BFLOAT__  // MSL 3.1+
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;
#endif

template <class T, int R, int C>
MSLEMU_INLINE simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, R, C> m;
  m.elements = vec<T, 2>(value);
  return m;
}

// Element (row, col) lives at origin + (row, col) in memory, or at origin + (col, row) when
// transposed: the origin is in the memory's coordinates (x = column, y = row). Which corner a
// transposed origin names on the GPU is unverified (README).
MSLEMU_INLINE size_t mslemu_offset(int row, int col, ulong stride, ulong2 origin, bool transpose) {
  size_t r = transpose ? col : row, c = transpose ? row : col;
  return (origin.y + r) * stride + origin.x + c;
}

template <class T, class P>
MSLEMU_INLINE void simdgroup_load(thread simdgroup_matrix<T, 8, 8>& m, P src, ulong elements_per_row = 8,
                                  ulong2 origin = ulong2(0), bool transpose = false) {
  auto c = mslemu::lane_coord(mslemu_lane());
  for (int j = 0; j < 2; ++j) m.elements[j] = T(src[mslemu_offset(c.row, c.col + j, elements_per_row, origin, transpose)]);
}

template <class T, class P>
MSLEMU_INLINE void simdgroup_store(const thread simdgroup_matrix<T, 8, 8>& m, P dst, ulong elements_per_row = 8,
                                   ulong2 origin = ulong2(0), bool transpose = false) {
  using E = std::remove_cv_t<std::remove_reference_t<decltype(dst[0])>>;
  auto c = mslemu::lane_coord(mslemu_lane());
  for (int j = 0; j < 2; ++j) dst[mslemu_offset(c.row, c.col + j, elements_per_row, origin, transpose)] = E(m.elements[j]);
}
}  // namespace metal

namespace mslemu {
template <class TA, class TB, class TC> struct MmaIn {
  const metal::vec<TA, 2>* a;
  const metal::vec<TB, 2>* b;
  const metal::vec<TC, 2>* c;
};

// Gathers the three 8x8 operands from the lanes, multiplies in float, scatters D. All inputs are
// read before any output is written, so D may alias A, B or C.
template <class TD, class TA, class TB, class TC>
void mma_fn(const void* const* ins, void* const* outs, uint32_t mask) {
  if (mask != 0xffffffffu) {
    mslemu_fail("simdgroup_multiply_accumulate: all 32 lanes of the simd-group must take part "
                "(some lanes had exited or were waiting elsewhere)");
    return;
  }
  float a[8][8], b[8][8], c[8][8];
  for (uint32_t l = 0; l < 32; ++l) {
    auto in = *static_cast<const MmaIn<TA, TB, TC>*>(ins[l]);
    auto p = lane_coord(l);
    for (int j = 0; j < 2; ++j) {
      a[p.row][p.col + j] = float((*in.a)[j]);
      b[p.row][p.col + j] = float((*in.b)[j]);
      c[p.row][p.col + j] = float((*in.c)[j]);
    }
  }
  for (uint32_t l = 0; l < 32; ++l) {
    auto p = lane_coord(l);
    metal::vec<TD, 2> d;
    for (int j = 0; j < 2; ++j) {
      float acc = c[p.row][p.col + j];
      for (int k = 0; k < 8; ++k) acc = __builtin_fmaf(a[p.row][k], b[k][p.col + j], acc);
      d[j] = TD(acc);
    }
    *static_cast<metal::vec<TD, 2>*>(outs[l]) = d;
  }
}
}  // namespace mslemu

namespace metal {
template <class TD, class TA, class TB, class TC>
MSLEMU_INLINE void simdgroup_multiply_accumulate(thread simdgroup_matrix<TD, 8, 8>& d,
                                                 const thread simdgroup_matrix<TA, 8, 8>& a,
                                                 const thread simdgroup_matrix<TB, 8, 8>& b,
                                                 const thread simdgroup_matrix<TC, 8, 8>& c, MSLEMU_SITE) {
  mslemu::MmaIn<TA, TB, TC> in{&a.elements, &b.elements, &c.elements};
  mslemu_simd_rendezvous(mslemu::mma_fn<TD, TA, TB, TC>, &in, &d.elements, MSLEMU_AT);
}
template <class TD, class TA, class TB>
MSLEMU_INLINE void simdgroup_multiply(thread simdgroup_matrix<TD, 8, 8>& d, const thread simdgroup_matrix<TA, 8, 8>& a,
                                      const thread simdgroup_matrix<TB, 8, 8>& b, MSLEMU_SITE) {
  simdgroup_matrix<TD, 8, 8> zero = make_filled_simdgroup_matrix<TD, 8, 8>(TD(0));
  simdgroup_multiply_accumulate(d, a, b, zero, line, col);
}
}  // namespace metal
