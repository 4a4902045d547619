// MSL vector types as clang ext_vector_type (so every swizzle works), plus what C++ lacks:
// MSL's vector constructors (`float4(v.xy, 0, 1)`, `half4(f4)`) are rewritten by the Python
// front end into mslemu::make<V>(...), defined here, because a C++ functional cast of a vector
// type takes at most one argument and would bit-cast rather than convert.
#pragma once
#include "types.h"

namespace metal {
template <class T, int N> using vec = T __attribute__((ext_vector_type(N)));

#define MSLEMU_VECTORS(T)                                  \
  typedef T T##2 __attribute__((ext_vector_type(2)));      \
  typedef T T##3 __attribute__((ext_vector_type(3)));      \
  typedef T T##4 __attribute__((ext_vector_type(4)));      \
  typedef T packed_##T##2 __attribute__((ext_vector_type(2))); \
  typedef T packed_##T##4 __attribute__((ext_vector_type(4)));
MSLEMU_VECTORS(float)
MSLEMU_VECTORS(half)
#ifdef __HAVE_BFLOAT__  // MSL 3.1+
MSLEMU_VECTORS(bfloat)
#endif
MSLEMU_VECTORS(char)
MSLEMU_VECTORS(uchar)
MSLEMU_VECTORS(short)
MSLEMU_VECTORS(ushort)
MSLEMU_VECTORS(int)
MSLEMU_VECTORS(uint)
MSLEMU_VECTORS(long)
MSLEMU_VECTORS(ulong)
MSLEMU_VECTORS(bool)
#undef MSLEMU_VECTORS

// Reinterprets the bits, as MSL's as_type; sizes must match (a compile error otherwise).
template <class To, class From> MSLEMU_INLINE To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type: source and destination sizes differ");
  return __builtin_bit_cast(To, x);
}
}  // namespace metal

namespace mslemu {
template <class V> struct vec_traits {
  static constexpr int size = 1;
  using elem = V;
};
template <class T, int N> struct vec_traits<metal::vec<T, N>> {
  static constexpr int size = N;
  using elem = T;
};
template <class V> constexpr int vec_size_v = vec_traits<std::remove_cv_t<V>>::size;
template <class V> using vec_elem_t = typename vec_traits<std::remove_cv_t<V>>::elem;

// Appends the components of `x` (scalar or vector) to `out`, converting each to the element type.
template <class V, class X> MSLEMU_INLINE void append(V& out, int& i, const X& x) {
  using E = vec_elem_t<V>;
  if constexpr (vec_size_v<X> == 1) {
    out[i++] = static_cast<E>(x);
  } else {
    for (int j = 0; j < vec_size_v<X>; ++j) out[i++] = static_cast<E>(x[j]);
  }
}

// MSL vector constructor: no argument = zeros, one scalar = splat, otherwise concatenation.
template <class V, class... A> MSLEMU_INLINE V make(const A&... a) {
  using E = vec_elem_t<V>;
  V out{};
  if constexpr (sizeof...(A) == 1 && (vec_size_v<A> + ...) == 1) {
    E splat = (static_cast<E>(a), ...);
    for (int j = 0; j < vec_size_v<V>; ++j) out[j] = splat;
  } else if constexpr (sizeof...(A) > 0) {
    static_assert((vec_size_v<A> + ...) == vec_size_v<V>,
                  "vector constructor: component count does not match the vector size");
    int i = 0;
    (append(out, i, a), ...);
  }
  return out;
}
}  // namespace mslemu
