"""Threadgroup memory, barriers and schedules: what makes missing barriers visible."""

import pytest
import torch

from mfa_hf.kernels.metal.emulator import EmulatorRuntimeError, EmulatorWarning, run_two_schedules

SRC = r"""
#include <metal_stdlib>
using namespace metal;
// Reverses each block of 64 through threadgroup memory.
kernel void reverse_blocks(device const float* x, device float* out, uint gid [[thread_position_in_grid]],
                           uint t [[thread_index_in_threadgroup]]) {
  threadgroup float tile[64];
  tile[t] = x[gid];
#ifndef NO_BARRIER
  threadgroup_barrier(mem_flags::mem_threadgroup);
#endif
  out[gid] = tile[63 - t];
}
kernel void read_unwritten(device float* out, uint t [[thread_index_in_threadgroup]]) {
  threadgroup float tile[32];
  out[t] = tile[t];
}
kernel void too_much_memory(device float* out, uint t [[thread_index_in_threadgroup]]) {
  threadgroup float a[4096];
  threadgroup float b[4100];  // 16384 + 16400 bytes: just over the limit
  a[t] = 1.0f; b[t] = 2.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[t] = a[t] + b[t];
}
kernel void divergent_barrier(device float* out, uint t [[thread_index_in_threadgroup]]) {
  if (t < 16) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[t] = 1.0f;
}
kernel void barrier_after_return(device float* out, constant uint& n, uint t [[thread_position_in_grid]]) {
  if (t >= n) return;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[t] = 1.0f;
}
"""


@pytest.fixture(scope="module")
def lib(emulator):
    return emulator.compile_shader(SRC)


def test_threadgroup_memory_is_shared_and_schedules_agree(lib):
    x = torch.randn(256)
    out = torch.full_like(x, float("nan"))
    run_two_schedules(lib, "reverse_blocks", [x, out], group_size=64)
    assert torch.equal(out, x.view(4, 64).flip(1).reshape(-1))


def test_removed_barrier_is_detected_by_two_schedules(emulator):
    # The define goes after the include (defines before it are an error, as they can break Apple's headers).
    lib = emulator.compile_shader(SRC.replace("using namespace metal;", "using namespace metal;\n#define NO_BARRIER 1", 1))
    x, out = torch.randn(256), torch.zeros(256)
    with pytest.raises(AssertionError, match=r"reverse_blocks: output 1 differs between schedules 'forward' and 'sg-random'"):
        run_two_schedules(lib, "reverse_blocks", [x, out], group_size=64)


def test_threadgroup_memory_starts_as_nan(lib):
    out = torch.zeros(32)
    lib.read_unwritten(out, group_size=32)
    assert out.isnan().all()
    lib.read_unwritten(out, group_size=32, poison=False)
    assert (out == 0).all()


def test_more_than_32_kib_of_threadgroup_memory_fails(lib):
    with pytest.raises(EmulatorRuntimeError, match=r"too_much_memory: threadgroup memory: .* 32784 bytes, over the 32 KiB \(32768-byte\) limit"):
        lib.too_much_memory(torch.zeros(32), group_size=32)


def test_divergent_barriers_fail(lib):
    with pytest.raises(EmulatorRuntimeError, match=r"different barriers \(lines \d+ and \d+\)"):
        lib.divergent_barrier(torch.zeros(64), group_size=64)


def test_barrier_after_some_threads_returned_warns(lib):
    out = torch.zeros(64)
    with pytest.warns(EmulatorWarning, match=r"passed after 24 thread\(s\) of the threadgroup returned"):
        lib.barrier_after_return(out, 40, group_size=64, arg_casts={1: "int32"})
    assert out.sum() == 40


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random", "sg-forward", "sg-reverse", "sg-random"])
def test_every_schedule_runs_a_correct_kernel(lib, schedule):
    x = torch.randn(128)
    out = torch.zeros(128)
    lib.reverse_blocks(x, out, group_size=64, schedule=schedule)
    assert torch.equal(out, x.view(2, 64).flip(1).reshape(-1))


def test_unknown_schedule_is_rejected(lib):
    with pytest.raises(ValueError, match=r"schedule: expected one of .*got 'sideways'"):
        lib.reverse_blocks(torch.zeros(64), torch.zeros(64), schedule="sideways")
