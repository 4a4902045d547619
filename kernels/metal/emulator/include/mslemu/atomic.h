// MSL atomics (relaxed order only, as in Metal). Threadgroups run on several OS threads, so
// device atomics must be real atomics; the address space is cast away because the __atomic
// builtins take generic pointers.
#pragma once
#include "types.h"

namespace metal {
enum memory_order { memory_order_relaxed = 0, memory_order_seq_cst = 5 };
enum class thread_scope { thread_scope_thread, thread_scope_simdgroup, thread_scope_threadgroup, thread_scope_device };

template <class T> struct atomic {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "Metal atomics are 32- or 64-bit");
  typedef T value_type;
  T value;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;
typedef atomic<ulong> atomic_ulong;
}  // namespace metal

namespace mslemu {
template <class P> using atomic_value_t = typename std::remove_cv_t<std::remove_pointer_t<P>>::value_type;
template <class P> MSLEMU_INLINE atomic_value_t<P>* generic(P obj) { return (atomic_value_t<P>*)(&obj->value); }
// Float read-modify-write via compare-exchange (no native float fetch_add on x86).
// The generic (non-_n) builtins accept float as well as integers.
template <class T, class F> MSLEMU_INLINE T rmw_cas(T* p, F f) {
  T old;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  T desired = f(old);
  while (!__atomic_compare_exchange(p, &old, &desired, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) desired = f(old);
  return old;
}
}  // namespace mslemu

namespace metal {
template <class P, class V> MSLEMU_INLINE void atomic_store_explicit(P obj, V v, memory_order = memory_order_relaxed) {
  auto value = mslemu::atomic_value_t<P>(v);
  __atomic_store(mslemu::generic(obj), &value, __ATOMIC_RELAXED);
}
template <class P> MSLEMU_INLINE auto atomic_load_explicit(P obj, memory_order = memory_order_relaxed) {
  mslemu::atomic_value_t<P> value;
  __atomic_load(mslemu::generic(obj), &value, __ATOMIC_RELAXED);
  return value;
}
template <class P, class V> MSLEMU_INLINE auto atomic_exchange_explicit(P obj, V v, memory_order = memory_order_relaxed) {
  auto value = mslemu::atomic_value_t<P>(v);
  decltype(value) old;
  __atomic_exchange(mslemu::generic(obj), &value, &old, __ATOMIC_RELAXED);
  return old;
}
template <class P, class E, class V>
MSLEMU_INLINE bool atomic_compare_exchange_weak_explicit(P obj, E expected, V desired, memory_order = memory_order_relaxed,
                                                         memory_order = memory_order_relaxed) {
  auto value = mslemu::atomic_value_t<P>(desired);
  return __atomic_compare_exchange(mslemu::generic(obj), (mslemu::atomic_value_t<P>*)expected, &value, true,
                                   __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

#define MSLEMU_FETCH(NAME, BUILTIN, EXPR)                                                         \
  template <class P, class V> MSLEMU_INLINE auto NAME(P obj, V v, memory_order = memory_order_relaxed) { \
    using T = mslemu::atomic_value_t<P>;                                                          \
    T arg = T(v);                                                                                 \
    if constexpr (std::is_integral_v<T>) return BUILTIN(mslemu::generic(obj), arg, __ATOMIC_RELAXED); \
    else return mslemu::rmw_cas(mslemu::generic(obj), [arg](T old) { return T(EXPR); });          \
  }
MSLEMU_FETCH(atomic_fetch_add_explicit, __atomic_fetch_add, old + arg)
MSLEMU_FETCH(atomic_fetch_sub_explicit, __atomic_fetch_sub, old - arg)
MSLEMU_FETCH(atomic_fetch_and_explicit, __atomic_fetch_and, old)
MSLEMU_FETCH(atomic_fetch_or_explicit, __atomic_fetch_or, old)
MSLEMU_FETCH(atomic_fetch_xor_explicit, __atomic_fetch_xor, old)
#undef MSLEMU_FETCH

template <class P, class V> MSLEMU_INLINE auto atomic_fetch_min_explicit(P obj, V v, memory_order = memory_order_relaxed) {
  using T = mslemu::atomic_value_t<P>;
  T arg = T(v);
  return mslemu::rmw_cas(mslemu::generic(obj), [arg](T old) { return arg < old ? arg : old; });
}
template <class P, class V> MSLEMU_INLINE auto atomic_fetch_max_explicit(P obj, V v, memory_order = memory_order_relaxed) {
  using T = mslemu::atomic_value_t<P>;
  T arg = T(v);
  return mslemu::rmw_cas(mslemu::generic(obj), [arg](T old) { return old < arg ? arg : old; });
}
template <class Flags> MSLEMU_INLINE void atomic_thread_fence(Flags, memory_order, thread_scope = thread_scope::thread_scope_device) {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
}  // namespace metal
