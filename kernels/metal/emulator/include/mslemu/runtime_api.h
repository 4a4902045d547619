// The contract between compiled kernels (the shim headers) and the fiber runtime
// (runtime/*.cpp). Plain C so that the Python side can also rely on the layouts.
#pragma once
#include <stdint.h>
#include <stddef.h>

extern "C" {
// Built-in ids of one GPU thread, filled by the runtime before its fiber starts.
struct mslemu_ids {
  uint32_t thread_position_in_grid[3];
  uint32_t threadgroup_position_in_grid[3];
  uint32_t thread_position_in_threadgroup[3];
  uint32_t threads_per_threadgroup[3];
  uint32_t threadgroups_per_grid[3];
  uint32_t threads_per_grid[3];
  uint32_t thread_index_in_threadgroup;
  uint32_t simdgroup_index_in_threadgroup;
  uint32_t thread_index_in_simdgroup;
  uint32_t simdgroups_per_threadgroup;
};

// A simd-group collective, run once by the runtime when every participating lane has arrived:
// ins[l]/outs[l] are lane l's argument and result (null for lanes outside active_mask).
typedef void (*mslemu_collective_fn)(const void* const* ins, void* const* outs, uint32_t active_mask);

// Kernel entry generated per kernel by the front end.
typedef void (*mslemu_kernel_fn)(void* const* buffers, const mslemu_ids* ids);

// Suspends the calling GPU thread until the rest of its simd-group arrives at a collective.
void mslemu_simd_rendezvous(mslemu_collective_fn fn, const void* in, void* out, uint32_t site);
// Suspends the calling GPU thread until every live thread of its threadgroup arrives.
void mslemu_threadgroup_barrier(uint32_t site);
// Threadgroup memory for declaration `decl`, shared by the threadgroup and poisoned on first use.
void* mslemu_threadgroup_alloc(uint32_t decl, size_t size, size_t align, uint32_t line);
// The calling thread's lane in its simd-group (0..31).
uint32_t mslemu_lane(void);
// Aborts the dispatch with an error message (from a kernel thread or a collective).
void mslemu_fail(const char* message);
// Records a warning for the Python side, once per (message) per dispatch.
void mslemu_warn(const char* message);
// Adds one executed basic block's static cost counts (only counted builds call it: cost_instrument.py).
void mslemu_cost_add(const int64_t* block);
}

namespace mslemu {
constexpr uint32_t kSimdWidth = 32;
// A call site's identity: the MSL line (via #line) and column of the call.
constexpr uint32_t site_id(uint32_t line, uint32_t column) { return (line << 12) | (column & 0xfff); }
}  // namespace mslemu
