// Quantize on write: float -> fp8_e4m3 / fp8_e5m2 / int8 / nf4 codes, bit-exact with mfa_hf/quant.py
// (torch's float8 conversion rounds to nearest even; int8 rounds half to even; nf4 takes the
// nearest NormalFloat level, a value exactly on a midpoint going to the lower level, as
// torch.bucketize does).
#pragma once
#include "dequant.h"
#include "finite_math.h"

// 2^e for a normal float exponent, built from its bits.
inline float pow2(int e) { return as_type<float>(uint(e + 127) << 23); }

// The NaN code of both FP8 formats, with the NaN's sign, as torch converts it (0x7F / 0xFF). The
// caller tests the stored element's bits (finite_math.h): with fast math, isnan() on the scaled
// value may be compiled away.
inline uchar fp8_nan(bool negative) { return negative ? uchar(0xFF) : uchar(0x7F); }

// |x| rounded to nearest even with `mantissa_bits` kept; normals from 2^min_exp, subnormal step
// 2^(min_exp - mantissa_bits). The caller clamps to the format's largest finite value first and
// handles NaN (fp8_nan).
inline uchar fp8_from_float(float x, int mantissa_bits, int bias, int min_exp) {
  const uint bits = as_type<uint>(x);
  const uchar sign = uchar((bits >> 31) << 7);
  const float a = fabs(x);
  if (a < pow2(min_exp)) {  // subnormal (a code of 1 << mantissa_bits is the smallest normal)
    return sign | uchar(rint(a * pow2(mantissa_bits - min_exp)));
  }
  const uint abs_bits = bits & 0x7FFFFFFFu;
  const int drop = 23 - mantissa_bits;
  const uint rounded = abs_bits + ((1u << (drop - 1)) - 1u) + ((abs_bits >> drop) & 1u);
  const int exponent = int(rounded >> 23) - 127;
  const uint mantissa = (rounded >> drop) & ((1u << mantissa_bits) - 1u);
  return sign | uchar((uint(exponent + bias) << mantissa_bits) | mantissa);
}

inline uchar nf4_index(float x) {
  uchar index = 0;
  for (int k = 0; k < 15; ++k) index += (NF4_LEVELS[k] + NF4_LEVELS[k + 1]) * 0.5f < x ? 1 : 0;
  return index;
}
