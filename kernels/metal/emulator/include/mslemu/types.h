// Scalar types and numeric limits (part of the prelude: Apple's compiler knows the scalar types
// without any include; the math constants are in constants.h, which comes with <metal_stdlib>).
// half and bfloat are clang's _Float16 and __bf16; the compiler flags
// -ffloat16-excess-precision=none / -fbfloat16-excess-precision=none make every operation on
// them round to the type, as the GPU does.
#pragma once
#include <stdint.h>
#include <stddef.h>
#include <type_traits>

namespace metal {
typedef _Float16 half;
// bfloat exists from MSL 3.1 only (__HAVE_BFLOAT__); the shim itself uses __bf16 internally so
// that under MSL 3.0 a kernel naming `bfloat` fails to compile, as on a Mac.
#ifdef __HAVE_BFLOAT__
typedef __bf16 bfloat;
#endif
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;

template <class T> struct numeric_limits;  // T: all caps, like Apple's headers
#define MSLEMU_LIMITS(T, LOWEST, MIN, MAX, EPS, IS_INT)                              \
  template <> struct numeric_limits<T> {                                             \
    static constexpr bool is_specialized = true;                                     \
    static constexpr bool is_integer = IS_INT;                                       \
    static constexpr T lowest() { return static_cast<T>(LOWEST); }                                \
    static constexpr T min() { return static_cast<T>(MIN); }                                   \
    static constexpr T max() { return static_cast<T>(MAX); }                                   \
    static constexpr T epsilon() { return static_cast<T>(EPS); }                                  \
    template <class U = T> static constexpr U infinity() { return U(__builtin_inff()); } \
    template <class U = T> static constexpr U quiet_NaN() { return U(__builtin_nanf("")); } \
  };
MSLEMU_LIMITS(float, -3.40282347e38f, 1.17549435e-38f, 3.40282347e38f, 1.1920929e-7f, false)
MSLEMU_LIMITS(half, -65504.0f, 6.10351562e-5f, 65504.0f, 9.765625e-4f, false)
MSLEMU_LIMITS(__bf16, -3.38953139e38f, 1.17549435e-38f, 3.38953139e38f, 7.8125e-3f, false)
MSLEMU_LIMITS(char, -128, -128, 127, 0, true)
MSLEMU_LIMITS(signed char, -128, -128, 127, 0, true)  // int8_t: a type distinct from char in C++
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
using metal::half;
using bf16 = __bf16;
// True for the scalar types MSL does arithmetic on (std traits do not know _Float16/__bf16).
template <class T> constexpr bool is_float_v =
    std::is_same_v<T, float> || std::is_same_v<T, metal::half> || std::is_same_v<T, __bf16>;
template <class T> constexpr bool is_scalar_v = is_float_v<T> || std::is_integral_v<T>;
// Removes an address-space qualifier (std traits do not see through it).
template <class T> struct strip_address_space { using type = T; };
template <class T> struct strip_address_space<__attribute__((address_space(1))) T> { using type = T; };
template <class T> struct strip_address_space<__attribute__((address_space(2))) T> { using type = T; };
template <class T> struct strip_address_space<__attribute__((address_space(3))) T> { using type = T; };
template <class T> using plain_t = std::remove_cv_t<typename strip_address_space<std::remove_cv_t<T>>::type>;
}  // namespace mslemu
