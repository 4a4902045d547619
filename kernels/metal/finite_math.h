// Tests and constants that stay right when the kernels are compiled with fast math.
//
// PYTORCH_MPS_FAST_MATH=1 makes torch compile with fast math, and then the compiler may assume
// that no value is infinite or NaN: `x == -INFINITY`, `isnan(x)` and `isinf(x)` can be folded to
// false and arithmetic on infinities is undefined. So the kernels never use inf or NaN as a state:
// visibility is carried as a flag, running maxima start at the lowest finite float (as MLX's
// kernels do), and the infinities the semantics do ask for (the LSE of a row that saw no key, a
// user's -inf mask entry or sink) are written or recognised through their bit patterns, on values
// loaded from memory, where no floating-point assumption can reach them.
#pragma once
#include <metal_stdlib>
using namespace metal;

// The lowest finite float (-FLT_MAX): the running maximum before any key was seen. Every finite
// score, including a transformers mask's finfo(float32).min, is >= it.
constant float LOWEST_FINITE = -3.402823466e+38f;
constant uint NEG_INF_BITS = 0xFF800000u;

// A value read from memory as integer bits, with what the bits say. The bits are tested as the
// integers they were loaded as: a float that is bit-cast and compared is still folded away by
// clang under -ffinite-math-only ("cannot be -inf"), and Apple's compiler is LLVM too.
struct Stored {
  float value;
  bool neg_inf;
  bool nan;
  bool nonfinite;  // NaN or an infinity (every exponent bit set)
  bool negative;  // the sign bit (of a NaN too)
};

inline Stored read_stored(device const float* p, long i) {
  const uint bits = ((device const uint*)p)[i];
  Stored s;
  s.value = as_type<float>(bits);
  s.neg_inf = bits == NEG_INF_BITS;
  s.nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  s.nonfinite = (bits & 0x7FFFFFFFu) >= 0x7F800000u;
  s.negative = (bits >> 31) != 0;
  return s;
}

// A 16-bit float's bits (half: infinity 0x7C00, bfloat: 0x7F80) and its value.
inline Stored stored_16(ushort bits, float value, ushort infinity) {
  Stored s;
  s.value = value;
  s.neg_inf = bits == ushort(infinity | 0x8000);
  s.nan = (bits & ushort(0x7FFF)) > infinity;
  s.nonfinite = (bits & ushort(0x7FFF)) >= infinity;
  s.negative = (bits >> 15) != 0;
  return s;
}

inline Stored read_stored(device const half* p, long i) {
  const ushort bits = ((device const ushort*)p)[i];
  return stored_16(bits, float(as_type<half>(bits)), ushort(0x7C00));
}

#if __METAL_VERSION__ >= 310  // bfloat exists from MSL 3.1
inline Stored read_stored(device const bfloat* p, long i) {
  const ushort bits = ((device const ushort*)p)[i];
  return stored_16(bits, float(as_type<bfloat>(bits)), ushort(0x7F80));
}
#endif

// p[i] = value, or -inf when `keep` is false (the LSE of a row that saw nothing), written as
// integer bits so that no float select with an infinite operand exists to be folded.
inline void store_or_neg_inf(device float* p, long i, bool keep, float value) {
  ((device uint*)p)[i] = keep ? as_type<uint>(value) : NEG_INF_BITS;
}

// exp2(d) for a d <= 0 by construction (a score minus the running maximum, in log2 units). A d
// below -256 (0 in float32), including one that overflowed to -inf from two finite extremes such
// as finfo.min - 5, is taken as -256; a NaN compares false and passes through, so a NaN score
// still reaches the output as the reference says (without fast math).
// Compiled with fast math (torch's PYTORCH_MPS_FAST_MATH=1; clang defines __FINITE_MATH_ONLY__)
// it is fast::exp2, as MLX's kernels use; torch's safe mode keeps precise::exp2, the variant
// whose NaN propagation and error bound the tests hold the safe mode to.
#if defined(__FAST_MATH__) || (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__)
#define MFA_EXP2 fast::exp2
#else
#define MFA_EXP2 precise::exp2
#endif
inline float exp2_of_nonpositive(float d) { return MFA_EXP2(d < -256.0f ? -256.0f : d); }
