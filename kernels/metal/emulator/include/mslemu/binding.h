// Binds a kernel's parameters for the entry wrappers the front end generates. The parameter
// types come from the function itself (template deduction), so template instantiations need no
// type parsing; the front end supplies only what the attributes say (buffer index or built-in).
#pragma once
#include <utility>
#include "runtime_api.h"
#include "vectors.h"

namespace mslemu {
// Built-in ids, numbered as in library.py's BUILTINS table.
enum Builtin : int {
  kBuffer = 0,
  kThreadPositionInGrid, kThreadgroupPositionInGrid, kThreadPositionInThreadgroup,
  kThreadIndexInThreadgroup, kThreadsPerThreadgroup, kThreadgroupsPerGrid,
  kSimdgroupIndexInThreadgroup, kThreadIndexInSimdgroup, kThreadsPerSimdgroup,
  kThreadsPerGrid, kSimdgroupsPerThreadgroup, kThreadExecutionWidth,
  kQuadgroupIndexInThreadgroup, kThreadIndexInQuadgroup, kDispatchThreadsPerThreadgroup,
};
struct ParamSpec { int kind; int buffer; };

inline metal::uint3 v3(const uint32_t* v) { return metal::uint3{v[0], v[1], v[2]}; }
inline metal::uint3 builtin_value(int kind, const mslemu_ids& ids) {
  switch (kind) {
    case kThreadPositionInGrid: return v3(ids.thread_position_in_grid);
    case kThreadgroupPositionInGrid: return v3(ids.threadgroup_position_in_grid);
    case kThreadPositionInThreadgroup: return v3(ids.thread_position_in_threadgroup);
    case kThreadIndexInThreadgroup: return metal::uint3{ids.thread_index_in_threadgroup, 0, 0};
    case kThreadsPerThreadgroup: return v3(ids.threads_per_threadgroup);
    case kDispatchThreadsPerThreadgroup: return v3(ids.threads_per_threadgroup);
    case kThreadgroupsPerGrid: return v3(ids.threadgroups_per_grid);
    case kSimdgroupIndexInThreadgroup: return metal::uint3{ids.simdgroup_index_in_threadgroup, 0, 0};
    case kThreadIndexInSimdgroup: return metal::uint3{ids.thread_index_in_simdgroup, 0, 0};
    case kThreadsPerSimdgroup: return metal::uint3{kSimdWidth, 0, 0};
    case kThreadExecutionWidth: return metal::uint3{kSimdWidth, 0, 0};
    case kThreadsPerGrid: return v3(ids.threads_per_grid);
    case kSimdgroupsPerThreadgroup: return metal::uint3{ids.simdgroups_per_threadgroup, 0, 0};
    case kQuadgroupIndexInThreadgroup: return metal::uint3{ids.thread_index_in_threadgroup / 4, 0, 0};
    case kThreadIndexInQuadgroup: return metal::uint3{ids.thread_index_in_threadgroup % 4, 0, 0};
  }
  return metal::uint3{0, 0, 0};
}

template <class P> MSLEMU_INLINE P bind_param(const ParamSpec& spec, void* const* buffers, const mslemu_ids& ids) {
  if constexpr (std::is_pointer_v<P>) {
    return (P)buffers[spec.buffer];
  } else if constexpr (std::is_reference_v<P>) {
    return *(std::remove_reference_t<P>*)buffers[spec.buffer];
  } else {
    using V = std::remove_cv_t<P>;
    metal::uint3 v = builtin_value(spec.kind, ids);
    if constexpr (vec_size_v<V> == 1) return V(v.x);
    else if constexpr (vec_size_v<V> == 2) return make<V>(v.x, v.y);
    else return make<V>(v.x, v.y, v.z);
  }
}

template <class... A, size_t... I>
MSLEMU_INLINE void invoke_impl(void (*f)(A...), const ParamSpec* specs, void* const* buffers, const mslemu_ids* ids,
                               std::index_sequence<I...>) {
  f(bind_param<A>(specs[I], buffers, *ids)...);
}
template <class... A>
MSLEMU_INLINE void invoke(void (*f)(A...), const ParamSpec* specs, void* const* buffers, const mslemu_ids* ids) {
  invoke_impl(f, specs, buffers, ids, std::index_sequence_for<A...>{});
}

// What the Python side needs to check arguments: per parameter, the pointee size and whether
// it is a reference (a scalar read) and whether the pointee is a plain scalar type.
template <class P> void describe_param(int64_t* out) {
  using Pointee = plain_t<std::remove_pointer_t<std::remove_reference_t<P>>>;
  bool indirect = std::is_pointer_v<P> || std::is_reference_v<P>;
  out[0] = indirect ? int64_t(sizeof(Pointee)) : 0;
  out[1] = std::is_reference_v<P>;
  out[2] = is_scalar_v<Pointee>;
}
template <class... A> int describe(void (*)(A...), int64_t* out) {
  int i = 0;
  ((describe_param<A>(out + 3 * i), ++i), ...);
  return i;
}
}  // namespace mslemu
