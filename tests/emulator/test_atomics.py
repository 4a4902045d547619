"""Atomics across threadgroups (several OS threads) and within one."""

import torch

SRC = r"""
#include <metal_stdlib>
using namespace metal;
kernel void count(device atomic_int* counter, device atomic_float* total, device atomic_uint* biggest,
                  device const float* x, uint gid [[thread_position_in_grid]], uint t [[thread_index_in_threadgroup]]) {
  threadgroup atomic_int local;
  if (t == 0) atomic_store_explicit(&local, 0, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  atomic_fetch_add_explicit(&local, 1, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (t == 0) atomic_fetch_add_explicit(counter, atomic_load_explicit(&local, memory_order_relaxed), memory_order_relaxed);
  atomic_fetch_add_explicit(total, x[gid], memory_order_relaxed);
  atomic_fetch_max_explicit(biggest, gid, memory_order_relaxed);
}
"""


def test_atomics(metal):
    lib = metal.compile_shader(SRC)
    counter, total = torch.zeros(1, dtype=torch.int32, device=metal.device), torch.zeros(1, device=metal.device)
    biggest = torch.zeros(1, dtype=torch.int32, device=metal.device)
    x = torch.full((4000,), 0.5, device=metal.device)
    lib.count(counter, total, biggest, x, threads=4000, group_size=128)
    assert counter.item() == 4000
    assert total.item() == 2000.0  # exact: every partial sum of halves is representable
    assert biggest.item() == 3999
