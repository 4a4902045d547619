// <metal_type_traits>: the type traits MSL has in namespace metal (MLX's headers and torch's
// c10/metal headers use them, qualified or after `using namespace metal`). Most are the std ones;
// the floating-point, arithmetic, scalar and signedness traits also know half and bfloat (__bf16),
// which std's do not. Not here, as in Metal: is_empty and void_t (MLX defines them in metal::).
#pragma once
#include <type_traits>
#include <utility>
#include "types.h"

namespace metal {
using std::bool_constant;
using std::conditional;
using std::conditional_t;
using std::declval;
using std::enable_if;
using std::enable_if_t;
using std::false_type;
using std::integral_constant;
using std::is_convertible;
using std::is_convertible_v;
using std::is_integral;
using std::is_integral_v;
using std::is_same;
using std::is_same_v;
using std::make_signed;
using std::make_signed_t;
using std::make_unsigned;
using std::make_unsigned_t;
using std::remove_const;
using std::remove_const_t;
using std::remove_cv;
using std::remove_cv_t;
using std::remove_volatile;
using std::remove_volatile_t;
using std::true_type;
template <class T> struct is_floating_point : bool_constant<mslemu::is_float_v<std::remove_cv_t<T>>> {};
template <class T> constexpr bool is_floating_point_v = is_floating_point<T>::value;
template <class T> struct is_arithmetic : bool_constant<is_integral_v<T> || is_floating_point_v<T>> {};
template <class T> constexpr bool is_arithmetic_v = is_arithmetic<T>::value;
template <class T> struct is_scalar : is_arithmetic<T> {};  // MSL: the scalar (non-vector) arithmetic types
template <class T> constexpr bool is_scalar_v = is_scalar<T>::value;
template <class T> struct is_signed : bool_constant<is_floating_point_v<T> || std::is_signed_v<T>> {};
template <class T> constexpr bool is_signed_v = is_signed<T>::value;
template <class T> struct is_unsigned : bool_constant<std::is_unsigned_v<T>> {};
template <class T> constexpr bool is_unsigned_v = is_unsigned<T>::value;
template <class T> struct remove_addrspace { using type = typename mslemu::strip_address_space<T>::type; };
template <class T> using remove_addrspace_t = typename remove_addrspace<T>::type;
}  // namespace metal
