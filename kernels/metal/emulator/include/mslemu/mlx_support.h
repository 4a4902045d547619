// Names MLX's kernel headers use that are not MSL library functions: the METAL_FUNC macro and the
// compiler builtins `__metal_*` that MLX's bf16_math.h calls to define bfloat overloads of
// metal:: math and simd functions. Validated by tests/emulator/test_mlx_kernels.py. (What MLX
// needed that Metal itself has lives with the rest of the library: os_log in logging.h,
// simd_shuffle_and_fill_up/down in simd.h, numeric_limits<signed char> in types.h, the metal::
// type traits in type_traits.h, cospi/divide/fmax3/... and the fast::/precise:: names in math.h.)
//
// The builtins compute in float with the same libm code as math.h (the fast/precise mode argument
// is ignored, as for fast:: and precise::), and the simd ones forward to simd.h's collectives.
#pragma once
#include <type_traits>
#include "math.h"
#include "simd.h"

#ifndef METAL_FUNC
#define METAL_FUNC inline __attribute__((always_inline))
#endif
// The math-mode arguments of the builtins (constants, not macros, so `#ifdef` in a kernel sees nothing).
constexpr int __METAL_MAYBE_FAST_MATH__ = 0;
constexpr int __METAL_FAST_MATH__ = 1;
constexpr int __METAL_PRECISE_MATH__ = 2;

// One float argument plus the ignored math mode.
#define MSLEMU_MLX_B1(NAME, EXPR) \
  template <class T, class... Mode> MSLEMU_INLINE T __metal_##NAME(T x, Mode...) { return static_cast<T>(EXPR); }
MSLEMU_MLX_B1(acos, metal::acos(x))
MSLEMU_MLX_B1(acosh, metal::acosh(x))
MSLEMU_MLX_B1(asin, metal::asin(x))
MSLEMU_MLX_B1(asinh, metal::asinh(x))
MSLEMU_MLX_B1(atan, metal::atan(x))
MSLEMU_MLX_B1(atanh, metal::atanh(x))
MSLEMU_MLX_B1(ceil, metal::ceil(x))
MSLEMU_MLX_B1(cos, metal::cos(x))
MSLEMU_MLX_B1(cosh, metal::cosh(x))
MSLEMU_MLX_B1(cospi, __builtin_cosf(3.14159265358979323846f * float(x)))
MSLEMU_MLX_B1(exp, metal::exp(x))
MSLEMU_MLX_B1(exp10, metal::exp10(x))
MSLEMU_MLX_B1(exp2, metal::exp2(x))
MSLEMU_MLX_B1(fabs, metal::fabs(x))
MSLEMU_MLX_B1(floor, metal::floor(x))
MSLEMU_MLX_B1(fract, metal::fract(x))
MSLEMU_MLX_B1(log, metal::log(x))
MSLEMU_MLX_B1(log10, metal::log10(x))
MSLEMU_MLX_B1(log2, metal::log2(x))
MSLEMU_MLX_B1(rint, metal::rint(x))
MSLEMU_MLX_B1(round, metal::round(x))
MSLEMU_MLX_B1(rsqrt, metal::rsqrt(x))
MSLEMU_MLX_B1(sin, metal::sin(x))
MSLEMU_MLX_B1(sinh, metal::sinh(x))
MSLEMU_MLX_B1(sinpi, __builtin_sinf(3.14159265358979323846f * float(x)))
MSLEMU_MLX_B1(sqrt, metal::sqrt(x))
MSLEMU_MLX_B1(tan, metal::tan(x))
MSLEMU_MLX_B1(tanh, metal::tanh(x))
MSLEMU_MLX_B1(tanpi, __builtin_tanf(3.14159265358979323846f * float(x)))
MSLEMU_MLX_B1(trunc, metal::trunc(x))
#undef MSLEMU_MLX_B1

// Two or three float arguments plus the ignored math mode.
#define MSLEMU_MLX_B2(NAME, EXPR) \
  template <class T, class... Mode> MSLEMU_INLINE T __metal_##NAME(T x, T y, Mode...) { return static_cast<T>(EXPR); }
MSLEMU_MLX_B2(atan2, metal::atan2(x, y))
MSLEMU_MLX_B2(divide, x / y)
MSLEMU_MLX_B2(fmax, metal::fmax(x, y))
MSLEMU_MLX_B2(fmin, metal::fmin(x, y))
MSLEMU_MLX_B2(fmod, metal::fmod(x, y))
MSLEMU_MLX_B2(pow, metal::pow(x, y))
MSLEMU_MLX_B2(powr, metal::powr(x, y))
MSLEMU_MLX_B2(nextafter, __builtin_nextafterf(float(x), float(y)))
#undef MSLEMU_MLX_B2
#define MSLEMU_MLX_B3(NAME, EXPR) \
  template <class T, class... Mode> MSLEMU_INLINE T __metal_##NAME(T x, T y, T z, Mode...) { return static_cast<T>(EXPR); }
MSLEMU_MLX_B3(fma, __builtin_fmaf(float(x), float(y), float(z)))
MSLEMU_MLX_B3(fmax3, metal::fmax(metal::fmax(x, y), z))
MSLEMU_MLX_B3(fmin3, metal::fmin(metal::fmin(x, y), z))
MSLEMU_MLX_B3(fmedian3, metal::fmax(metal::fmin(x, y), metal::fmin(metal::fmax(x, y), z)))
#undef MSLEMU_MLX_B3
template <class T> MSLEMU_INLINE T __metal_frexp(T x, thread int* e) { return static_cast<T>(__builtin_frexpf(float(x), e)); }
template <class T, class... Mode> MSLEMU_INLINE T __metal_ldexp(T x, int k, Mode...) {
  return static_cast<T>(__builtin_ldexpf(float(x), k));
}

// simd builtins: the call site seen by the runtime is the caller's (MLX's bfloat overload).
template <class T> MSLEMU_INLINE T __metal_get_simdgroup_size(T) { return T(mslemu::kSimdWidth); }
#define MSLEMU_MLX_S1(NAME) \
  template <class T> MSLEMU_INLINE T __metal_##NAME(T x, MSLEMU_SITE) { return metal::NAME(x, line, col); }
MSLEMU_MLX_S1(simd_max)
MSLEMU_MLX_S1(simd_min)
MSLEMU_MLX_S1(simd_sum)
MSLEMU_MLX_S1(simd_product)
MSLEMU_MLX_S1(simd_prefix_exclusive_product)
MSLEMU_MLX_S1(simd_prefix_exclusive_sum)
MSLEMU_MLX_S1(simd_prefix_inclusive_product)
MSLEMU_MLX_S1(simd_prefix_inclusive_sum)
#undef MSLEMU_MLX_S1
// MLX's bfloat simd_xor passes a float: xor its bits.
template <class T> MSLEMU_INLINE T __metal_simd_xor(T x, MSLEMU_SITE) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;
  return __builtin_bit_cast(T, metal::simd_xor(__builtin_bit_cast(Bits, x), line, col));
}
#define MSLEMU_MLX_S2(NAME) \
  template <class T, class I> MSLEMU_INLINE T __metal_##NAME(T x, I arg, MSLEMU_SITE) { return metal::NAME(x, arg, line, col); }
MSLEMU_MLX_S2(simd_broadcast)
MSLEMU_MLX_S2(simd_shuffle)
MSLEMU_MLX_S2(simd_shuffle_down)
MSLEMU_MLX_S2(simd_shuffle_up)
MSLEMU_MLX_S2(simd_shuffle_xor)
MSLEMU_MLX_S2(simd_shuffle_rotate_down)
MSLEMU_MLX_S2(simd_shuffle_rotate_up)
#undef MSLEMU_MLX_S2

template <class T, class D, class M>
MSLEMU_INLINE T __metal_simd_shuffle_and_fill_down(T x, T fill, D delta, M modulo, MSLEMU_SITE) {
  return metal::simd_shuffle_and_fill_down(x, fill, delta, modulo, line, col);
}
template <class T, class D, class M>
MSLEMU_INLINE T __metal_simd_shuffle_and_fill_up(T x, T fill, D delta, M modulo, MSLEMU_SITE) {
  return metal::simd_shuffle_and_fill_up(x, fill, delta, modulo, line, col);
}
