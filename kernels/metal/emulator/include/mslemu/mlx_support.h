// Names Apple's <metal_stdlib> provides that MLX's kernel headers use and the other shim headers
// do not: the METAL_FUNC macro, metal::os_log (<metal_logging>, Metal 3.2), and the compiler
// builtins `__metal_*` that MLX's bf16_math.h calls to define bfloat overloads of metal:: math and
// simd functions. Validated by tests/emulator/test_mlx_kernels.py.
//
// The builtins compute in float with the same libm code as math.h (the fast/precise mode argument
// is ignored, as for fast:: and precise::), and the simd ones forward to simd.h's collectives.
// Also here: metal::simd_shuffle_and_fill_up/down (MSL 2.4), numeric_limits<signed char> (int8_t),
// the float forms of the math functions bf16_math.h overloads that math.h lacks, and
// using-declarations that put math.h's templates into metal::fast and metal::precise themselves:
// math.h reaches them through a using-directive, which qualified lookup only follows when the
// namespace declares no function of that name, so once MLX declares fast::exp(bfloat) a call
// fast::exp(float) would silently pick it and compute in bfloat.
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

namespace metal {
// <metal_logging>: MLX only constructs loggers and calls log_debug; the emulator drops the output.
struct os_log {
  constexpr os_log(const char*, const char*) {}
  template <class... Args> void log_debug(Args...) const {}
  template <class... Args> void log_info(Args...) const {}
  template <class... Args> void log_error(Args...) const {}
};
}  // namespace metal

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

namespace metal {
// Lane i of each group of `modulo` lanes takes `data` from lane i + delta (down) or i - delta (up)
// when that lane is in its group, else `filling` from the lane delta - modulo further. Built on two
// shuffles that every lane joins (the second at the next column, so the two sites differ).
template <class T, class D, class M = ushort>
MSLEMU_INLINE T simd_shuffle_and_fill_down(T data, T filling, D delta, M modulo = M(32), MSLEMU_SITE) {
  uint32_t lane = mslemu_lane(), m = uint32_t(modulo), j = lane % m, d = uint32_t(delta);
  bool inside = j + d < m;
  uint32_t src = lane - j + (inside ? j + d : j + d - m);
  T a = simd_shuffle(data, ushort(src), line, col);
  T b = simd_shuffle(filling, ushort(src), line, col + 1);
  return inside ? a : b;
}
template <class T, class D, class M = ushort>
MSLEMU_INLINE T simd_shuffle_and_fill_up(T data, T filling, D delta, M modulo = M(32), MSLEMU_SITE) {
  uint32_t lane = mslemu_lane(), m = uint32_t(modulo), j = lane % m, d = uint32_t(delta);
  bool inside = j >= d;
  uint32_t src = lane - j + (inside ? j - d : j + m - d);
  T a = simd_shuffle(data, ushort(src), line, col);
  T b = simd_shuffle(filling, ushort(src), line, col + 1);
  return inside ? a : b;
}
// int8_t is `signed char`, a type distinct from `char` in C++ (same values on every target here).
template <> struct numeric_limits<signed char> : numeric_limits<char> {};
}  // namespace metal
template <class T, class D, class M>
MSLEMU_INLINE T __metal_simd_shuffle_and_fill_down(T x, T fill, D delta, M modulo, MSLEMU_SITE) {
  return metal::simd_shuffle_and_fill_down(x, fill, delta, modulo, line, col);
}
template <class T, class D, class M>
MSLEMU_INLINE T __metal_simd_shuffle_and_fill_up(T x, T fill, D delta, M modulo, MSLEMU_SITE) {
  return metal::simd_shuffle_and_fill_up(x, fill, delta, modulo, line, col);
}

// The std type traits MLX's headers name (unqualified after `using namespace metal`, or as
// metal::...). MLX's steel/utils/type_traits.h defines metal::is_empty and void_t itself.
namespace metal {
using std::bool_constant;
using std::conditional;
using std::conditional_t;
using std::enable_if;
using std::enable_if_t;
using std::integral_constant;
using std::is_convertible;
using std::is_convertible_v;
using std::is_integral;
using std::is_integral_v;
using std::is_same;
using std::is_same_v;
using std::remove_cv;
using std::remove_cv_t;
template <class T> struct remove_addrspace { using type = typename mslemu::strip_address_space<T>::type; };
template <class T> using remove_addrspace_t = typename remove_addrspace<T>::type;
}  // namespace metal

// Float forms of the functions bf16_math.h declares for bfloat that math.h does not have.
namespace metal {
#define MSLEMU_MLX_F(NAME, ARGS, CALL) \
  template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE T NAME ARGS { return __metal_##NAME CALL; }
MSLEMU_MLX_F(cospi, (T x), (x))
MSLEMU_MLX_F(sinpi, (T x), (x))
MSLEMU_MLX_F(tanpi, (T x), (x))
MSLEMU_MLX_F(divide, (T x, T y), (x, y))
MSLEMU_MLX_F(fmax3, (T x, T y, T z), (x, y, z))
MSLEMU_MLX_F(fmin3, (T x, T y, T z), (x, y, z))
MSLEMU_MLX_F(fmedian3, (T x, T y, T z), (x, y, z))
MSLEMU_MLX_F(nextafter, (T x, T y), (x, y))
MSLEMU_MLX_F(ldexp, (T x, int k), (x, k))
MSLEMU_MLX_F(frexp, (T x, thread int& e), (x, &e))
#undef MSLEMU_MLX_F
template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE T max3(T x, T y, T z) { return fmax3(x, y, z); }
template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE T min3(T x, T y, T z) { return fmin3(x, y, z); }
template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE T median3(T x, T y, T z) { return fmedian3(x, y, z); }
}  // namespace metal

#define MSLEMU_MLX_MATH_NAMES(X)                                                                  \
  X(abs) X(acos) X(acosh) X(asin) X(asinh) X(atan) X(atan2) X(atanh) X(ceil) X(cos) X(cosh)       \
  X(cospi) X(divide) X(exp) X(exp10) X(exp2) X(fabs) X(floor) X(fma) X(fmax) X(fmax3) X(fmedian3) \
  X(fmin) X(fmin3) X(fmod) X(fract) X(frexp) X(ldexp) X(log) X(log10) X(log2) X(max) X(max3)      \
  X(median3) X(min) X(min3) X(nextafter) X(pow) X(powr) X(rint) X(round) X(rsqrt) X(sin) X(sinh)  \
  X(sinpi) X(sqrt) X(tan) X(tanh) X(tanpi) X(trunc)
#define MSLEMU_MLX_USING(NAME) using ::metal::NAME;
namespace metal {
namespace fast { MSLEMU_MLX_MATH_NAMES(MSLEMU_MLX_USING) }
namespace precise { MSLEMU_MLX_MATH_NAMES(MSLEMU_MLX_USING) }
}  // namespace metal
#undef MSLEMU_MLX_USING
#undef MSLEMU_MLX_MATH_NAMES
