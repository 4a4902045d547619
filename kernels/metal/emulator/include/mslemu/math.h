// metal:: math on scalars and vectors. half and bfloat are computed in float and rounded back.
// precise:: and fast:: resolve to the same correctly-rounded libm code: the emulator does not
// reproduce the GPU's fast-math approximations (see README, "what only Apple's hardware proves").
#pragma once
#include "vectors.h"

namespace mslemu {
template <class T> using if_float = std::enable_if_t<is_float_v<T>, int>;
template <class T> using if_int = std::enable_if_t<std::is_integral_v<T>, int>;
template <class T> using if_scalar = std::enable_if_t<is_scalar_v<T>, int>;
}  // namespace mslemu

namespace metal {
// One-argument float functions, elementwise on vectors.
#define MSLEMU_F1(NAME, EXPR)                                                              \
  template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE T NAME(T t) {                  \
    float x = static_cast<float>(t);                                                       \
    return static_cast<T>(EXPR);                                                           \
  }                                                                                        \
  template <class T, int N> MSLEMU_INLINE vec<T, N> NAME(vec<T, N> v) {                    \
    vec<T, N> r;                                                                           \
    for (int i = 0; i < N; ++i) r[i] = NAME(static_cast<T>(v[i]));                        \
    return r;                                                                              \
  }
MSLEMU_F1(sqrt, __builtin_sqrtf(x))
MSLEMU_F1(rsqrt, 1.0f / __builtin_sqrtf(x))
MSLEMU_F1(exp, __builtin_expf(x))
MSLEMU_F1(exp2, __builtin_exp2f(x))
MSLEMU_F1(exp10, __builtin_powf(10.0f, x))
MSLEMU_F1(log, __builtin_logf(x))
MSLEMU_F1(log2, __builtin_log2f(x))
MSLEMU_F1(log10, __builtin_log10f(x))
MSLEMU_F1(sin, __builtin_sinf(x))
MSLEMU_F1(cos, __builtin_cosf(x))
MSLEMU_F1(tan, __builtin_tanf(x))
MSLEMU_F1(asin, __builtin_asinf(x))
MSLEMU_F1(acos, __builtin_acosf(x))
MSLEMU_F1(atan, __builtin_atanf(x))
MSLEMU_F1(sinh, __builtin_sinhf(x))
MSLEMU_F1(cosh, __builtin_coshf(x))
MSLEMU_F1(tanh, __builtin_tanhf(x))
MSLEMU_F1(asinh, __builtin_asinhf(x))
MSLEMU_F1(acosh, __builtin_acoshf(x))
MSLEMU_F1(atanh, __builtin_atanhf(x))
MSLEMU_F1(erf, __builtin_erff(x))
MSLEMU_F1(floor, __builtin_floorf(x))
MSLEMU_F1(ceil, __builtin_ceilf(x))
MSLEMU_F1(round, __builtin_roundf(x))
MSLEMU_F1(rint, __builtin_rintf(x))
MSLEMU_F1(trunc, __builtin_truncf(x))
MSLEMU_F1(fabs, __builtin_fabsf(x))
MSLEMU_F1(fract, __builtin_fminf(x - __builtin_floorf(x), 0x1.fffffep-1f))
MSLEMU_F1(saturate, __builtin_fminf(__builtin_fmaxf(x, 0.0f), 1.0f))
MSLEMU_F1(sign, x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x != x ? 0.0f : x)))

// Two-argument float functions; vector forms take (vec, vec) and (vec, scalar).
#define MSLEMU_F2(NAME, EXPR)                                                              \
  template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE T NAME(T a_, T b_) {           \
    float x = static_cast<float>(a_), y = static_cast<float>(b_);                          \
    return static_cast<T>(EXPR);                                                           \
  }                                                                                        \
  template <class T, int N> MSLEMU_INLINE vec<T, N> NAME(vec<T, N> a, vec<T, N> b) {       \
    vec<T, N> r;                                                                           \
    for (int i = 0; i < N; ++i) r[i] = NAME(static_cast<T>(a[i]), static_cast<T>(b[i]));  \
    return r;                                                                              \
  }                                                                                        \
  template <class T, int N> MSLEMU_INLINE vec<T, N> NAME(vec<T, N> a, T b) {               \
    return NAME(a, vec<T, N>(b));                                                          \
  }
MSLEMU_F2(pow, __builtin_powf(x, y))
MSLEMU_F2(powr, __builtin_powf(x, y))
MSLEMU_F2(fmin, __builtin_fminf(x, y))
MSLEMU_F2(fmax, __builtin_fmaxf(x, y))
MSLEMU_F2(fmod, __builtin_fmodf(x, y))
MSLEMU_F2(atan2, __builtin_atan2f(x, y))
MSLEMU_F2(copysign, __builtin_copysignf(x, y))
MSLEMU_F2(step, y < x ? 0.0f : 1.0f)

// min/max/abs/clamp exist for floats (NaN-ignoring, like fmin/fmax) and integers.
template <class T, mslemu::if_scalar<T> = 0> MSLEMU_INLINE T min(T a, T b) {
  if constexpr (mslemu::is_float_v<T>) return fmin(a, b); else return b < a ? b : a;
}
template <class T, mslemu::if_scalar<T> = 0> MSLEMU_INLINE T max(T a, T b) {
  if constexpr (mslemu::is_float_v<T>) return fmax(a, b); else return a < b ? b : a;
}
template <class T, mslemu::if_scalar<T> = 0> MSLEMU_INLINE T abs(T a) {
  if constexpr (mslemu::is_float_v<T>) return fabs(a); else return a < 0 ? T(-a) : a;
}
template <class T, mslemu::if_scalar<T> = 0> MSLEMU_INLINE T clamp(T x, T lo, T hi) {
  return min(max(x, lo), hi);
}
template <class T, int N> MSLEMU_INLINE vec<T, N> min(vec<T, N> a, vec<T, N> b) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = min(static_cast<T>(a[i]), static_cast<T>(b[i]));
  return r;
}
template <class T, int N> MSLEMU_INLINE vec<T, N> max(vec<T, N> a, vec<T, N> b) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = max(static_cast<T>(a[i]), static_cast<T>(b[i]));
  return r;
}
template <class T, int N> MSLEMU_INLINE vec<T, N> min(vec<T, N> a, T b) { return min(a, vec<T, N>(b)); }
template <class T, int N> MSLEMU_INLINE vec<T, N> max(vec<T, N> a, T b) { return max(a, vec<T, N>(b)); }
template <class T, int N> MSLEMU_INLINE vec<T, N> abs(vec<T, N> a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = abs(static_cast<T>(a[i]));
  return r;
}
template <class T, int N> MSLEMU_INLINE vec<T, N> clamp(vec<T, N> x, vec<T, N> lo, vec<T, N> hi) {
  return min(max(x, lo), hi);
}
template <class T, int N> MSLEMU_INLINE vec<T, N> clamp(vec<T, N> x, T lo, T hi) {
  return min(max(x, vec<T, N>(lo)), vec<T, N>(hi));
}

// Fused and three-argument forms.
template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE T fma(T a, T b, T c) {
  return static_cast<T>(__builtin_fmaf(static_cast<float>(a), static_cast<float>(b), static_cast<float>(c)));
}
template <class T, int N> MSLEMU_INLINE vec<T, N> fma(vec<T, N> a, vec<T, N> b, vec<T, N> c) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = fma(static_cast<T>(a[i]), static_cast<T>(b[i]), static_cast<T>(c[i]));
  return r;
}
template <class T> MSLEMU_INLINE T mad(T a, T b, T c) { return fma(a, b, c); }
template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE T mix(T x, T y, T a) { return x + (y - x) * a; }
template <class T, int N> MSLEMU_INLINE vec<T, N> mix(vec<T, N> x, vec<T, N> y, vec<T, N> a) { return x + (y - x) * a; }
template <class T, int N> MSLEMU_INLINE vec<T, N> mix(vec<T, N> x, vec<T, N> y, T a) { return x + (y - x) * a; }
template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE T smoothstep(T e0, T e1, T x) {
  T t = clamp(T((x - e0) / (e1 - e0)), T(0), T(1));
  return t * t * (T(3) - T(2) * t);
}

// Classification; vector forms return bool vectors.
template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE bool isnan(T x) { return x != x; }
template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE bool isinf(T x) { return __builtin_isinf(static_cast<float>(x)); }
template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE bool isfinite(T x) { return __builtin_isfinite(static_cast<float>(x)); }
template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE bool signbit(T x) { return __builtin_signbit(static_cast<float>(x)); }

// Geometric.
template <class T, int N> MSLEMU_INLINE T dot(vec<T, N> a, vec<T, N> b) {
  T s = T(0);
  for (int i = 0; i < N; ++i) s += T(a[i] * b[i]);
  return s;
}
template <class T, int N> MSLEMU_INLINE T length(vec<T, N> a) { return sqrt(dot(a, a)); }
template <class T, int N> MSLEMU_INLINE T distance(vec<T, N> a, vec<T, N> b) { return length(a - b); }
template <class T, int N> MSLEMU_INLINE vec<T, N> normalize(vec<T, N> a) { return a * rsqrt(dot(a, a)); }

// Selection and reductions over bool vectors.
template <class T, class B, std::enable_if_t<mslemu::vec_size_v<T> == 1, int> = 0>
MSLEMU_INLINE T select(T a, T b, B c) { return c ? b : a; }
template <class T, int N, class B> MSLEMU_INLINE vec<T, N> select(vec<T, N> a, vec<T, N> b, B c) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = c[i] ? b[i] : a[i];
  return r;
}
MSLEMU_INLINE bool all(bool b) { return b; }
MSLEMU_INLINE bool any(bool b) { return b; }
template <class T, int N> MSLEMU_INLINE bool all(vec<T, N> v) {
  for (int i = 0; i < N; ++i) if (!v[i]) return false;
  return true;
}
template <class T, int N> MSLEMU_INLINE bool any(vec<T, N> v) {
  for (int i = 0; i < N; ++i) if (v[i]) return true;
  return false;
}

// Integer bit functions.
template <class T, mslemu::if_int<T> = 0> MSLEMU_INLINE T popcount(T x) {
  return T(__builtin_popcountll(static_cast<unsigned long long>(std::make_unsigned_t<T>(x))));
}
template <class T, mslemu::if_int<T> = 0> MSLEMU_INLINE T clz(T x) {
  constexpr int bits = 8 * sizeof(T);
  auto u = static_cast<unsigned long long>(std::make_unsigned_t<T>(x));
  return T(u == 0 ? bits : __builtin_clzll(u) - (64 - bits));
}
template <class T, mslemu::if_int<T> = 0> MSLEMU_INLINE T ctz(T x) {
  auto u = static_cast<unsigned long long>(std::make_unsigned_t<T>(x));
  return T(u == 0 ? 8 * sizeof(T) : __builtin_ctzll(u));
}
template <class T, mslemu::if_int<T> = 0> MSLEMU_INLINE T mulhi(T a, T b) {
  return T((static_cast<__int128>(a) * static_cast<__int128>(b)) >> (8 * sizeof(T)));
}

// Functions MSL has that C's libm spells differently, and three-argument forms.
MSLEMU_F1(cospi, __builtin_cosf(3.14159265358979323846f * x))
MSLEMU_F1(sinpi, __builtin_sinf(3.14159265358979323846f * x))
MSLEMU_F1(tanpi, __builtin_tanf(3.14159265358979323846f * x))
MSLEMU_F2(divide, x / y)
MSLEMU_F2(nextafter, __builtin_nextafterf(x, y))
#undef MSLEMU_F1
#undef MSLEMU_F2
template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE T fmax3(T x, T y, T z) { return fmax(fmax(x, y), z); }
template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE T fmin3(T x, T y, T z) { return fmin(fmin(x, y), z); }
template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE T fmedian3(T x, T y, T z) {
  return fmax(fmin(x, y), fmin(fmax(x, y), z));
}
template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE T max3(T x, T y, T z) { return fmax3(x, y, z); }
template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE T min3(T x, T y, T z) { return fmin3(x, y, z); }
template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE T median3(T x, T y, T z) { return fmedian3(x, y, z); }
template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE T ldexp(T x, int k) {
  return static_cast<T>(__builtin_ldexpf(static_cast<float>(x), k));
}
template <class T, mslemu::if_float<T> = 0> MSLEMU_INLINE T frexp(T x, thread int& e) {
  return static_cast<T>(__builtin_frexpf(static_cast<float>(x), &e));
}

// precise:: and fast:: name the same functions (see the header comment). Each name is declared
// in them (a using-declaration), not only reached through the using-directive: qualified lookup
// follows a using-directive only when the namespace itself declares nothing of that name, so a
// source that adds its own overload, such as MLX's `fast::exp(bfloat)`, would otherwise hide
// these templates and `fast::exp(x)` on a float would silently compute in bfloat.
#define MSLEMU_MATH_NAMES(X)                                                                       \
  X(abs) X(acos) X(acosh) X(all) X(any) X(asin) X(asinh) X(atan) X(atan2) X(atanh) X(ceil)        \
  X(clamp) X(clz) X(copysign) X(cos) X(cosh) X(cospi) X(ctz) X(distance) X(divide) X(dot) X(erf)  \
  X(exp) X(exp10) X(exp2) X(fabs) X(floor) X(fma) X(fmax) X(fmax3) X(fmedian3) X(fmin) X(fmin3)   \
  X(fmod) X(fract) X(frexp) X(isfinite) X(isinf) X(isnan) X(ldexp) X(length) X(log) X(log10)      \
  X(log2) X(mad) X(max) X(max3) X(median3) X(min) X(min3) X(mix) X(mulhi) X(nextafter)            \
  X(normalize) X(popcount) X(pow) X(powr) X(rint) X(round) X(rsqrt) X(saturate) X(select)         \
  X(sign) X(signbit) X(sin) X(sinh) X(sinpi) X(smoothstep) X(sqrt) X(step) X(tan) X(tanh)         \
  X(tanpi) X(trunc)
#define MSLEMU_USING(NAME) using ::metal::NAME;
namespace precise {
using namespace ::metal;
MSLEMU_MATH_NAMES(MSLEMU_USING)
}  // namespace precise
namespace fast {
using namespace ::metal;
MSLEMU_MATH_NAMES(MSLEMU_USING)
}  // namespace fast
#undef MSLEMU_USING
#undef MSLEMU_MATH_NAMES
}  // namespace metal
