// Scalar types, numeric limits and the math constants of <metal_stdlib>.
// half and bfloat are clang's _Float16 and __bf16; the compiler flags
// -ffloat16-excess-precision=none / -fbfloat16-excess-precision=none make every operation on
// them round to the type, as the GPU does.
#pragma once
#include <stdint.h>
#include <stddef.h>
#include <type_traits>

namespace metal {
typedef _Float16 half;
typedef __bf16 bfloat;
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;

template <class T> struct numeric_limits;
#define MSLEMU_LIMITS(T, LOWEST, MIN, MAX, EPS, IS_INT)                              \
  template <> struct numeric_limits<T> {                                             \
    static constexpr bool is_specialized = true;                                     \
    static constexpr bool is_integer = IS_INT;                                       \
    static constexpr T lowest() { return T(LOWEST); }                                \
    static constexpr T min() { return T(MIN); }                                      \
    static constexpr T max() { return T(MAX); }                                      \
    static constexpr T epsilon() { return T(EPS); }                                  \
    template <class U = T> static constexpr U infinity() { return U(__builtin_inff()); } \
    template <class U = T> static constexpr U quiet_NaN() { return U(__builtin_nanf("")); } \
  };
MSLEMU_LIMITS(float, -3.40282347e38f, 1.17549435e-38f, 3.40282347e38f, 1.1920929e-7f, false)
MSLEMU_LIMITS(half, -65504.0f, 6.10351562e-5f, 65504.0f, 9.765625e-4f, false)
MSLEMU_LIMITS(bfloat, -3.38953139e38f, 1.17549435e-38f, 3.38953139e38f, 7.8125e-3f, false)
MSLEMU_LIMITS(char, -128, -128, 127, 0, true)
MSLEMU_LIMITS(uchar, 0, 0, 255, 0, true)
MSLEMU_LIMITS(short, -32768, -32768, 32767, 0, true)
MSLEMU_LIMITS(ushort, 0, 0, 65535, 0, true)
MSLEMU_LIMITS(int, -2147483647 - 1, -2147483647 - 1, 2147483647, 0, true)
MSLEMU_LIMITS(uint, 0u, 0u, 4294967295u, 0u, true)
MSLEMU_LIMITS(long, -9223372036854775807L - 1, -9223372036854775807L - 1, 9223372036854775807L, 0, true)
MSLEMU_LIMITS(ulong, 0ul, 0ul, 18446744073709551615ul, 0ul, true)
#undef MSLEMU_LIMITS
}  // namespace metal

namespace mslemu {
using metal::bfloat;
using metal::half;
// True for the scalar types MSL does arithmetic on (std traits do not know _Float16/__bf16).
template <class T> constexpr bool is_float_v =
    std::is_same_v<T, float> || std::is_same_v<T, metal::half> || std::is_same_v<T, metal::bfloat>;
template <class T> constexpr bool is_scalar_v = is_float_v<T> || std::is_integral_v<T>;
// Removes an address-space qualifier (std traits do not see through it).
template <class T> struct strip_address_space { using type = T; };
template <class T> struct strip_address_space<__attribute__((address_space(1))) T> { using type = T; };
template <class T> struct strip_address_space<__attribute__((address_space(2))) T> { using type = T; };
template <class T> struct strip_address_space<__attribute__((address_space(3))) T> { using type = T; };
template <class T> using plain_t = std::remove_cv_t<typename strip_address_space<std::remove_cv_t<T>>::type>;
}  // namespace mslemu

#define MAXFLOAT 3.40282347e38f
#define FLT_MAX 3.40282347e38f
#define FLT_MIN 1.17549435e-38f
#define FLT_EPSILON 1.1920929e-7f
#define HALF_MAX ((metal::half)65504.0f)
#define HALF_MIN ((metal::half)6.10351562e-5f)
#define HALF_EPSILON ((metal::half)9.765625e-4f)
#define INFINITY __builtin_inff()
#define HUGE_VALF __builtin_inff()
#define NAN __builtin_nanf("")
#define M_E_F 2.71828183f
#define M_LOG2E_F 1.44269504f
#define M_LOG10E_F 0.434294482f
#define M_LN2_F 0.693147181f
#define M_LN10_F 2.30258509f
#define M_PI_F 3.14159265f
#define M_PI_2_F 1.57079633f
#define M_PI_4_F 0.785398163f
#define M_1_PI_F 0.318309886f
#define M_2_PI_F 0.636619772f
#define M_2_SQRTPI_F 1.12837917f
#define M_SQRT2_F 1.41421356f
#define M_SQRT1_2_F 0.707106781f
#define M_PI_H ((metal::half)3.14159265f)
#define M_LOG2E_H ((metal::half)1.44269504f)
