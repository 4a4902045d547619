"""The cost counters on hand-written kernels whose exact counts are known (so a counter cannot be
wrong silently), the IR classification rules on single instructions, and the scheduler's counts."""

from __future__ import annotations

import pytest
import torch

from mfa_hf.kernels.metal.emulator.cost_counters import COUNTERS, record_costs
from mfa_hf.kernels.metal.emulator import compile_shader
from mfa_hf.kernels.metal.emulator.cost_instrument import COUNTED, DebugFiles, block_counts

# Per thread: a half read (2 B), a constant float (4 B), a threadgroup float written and one read
# (4 B each), a float written (4 B); fmul + fadd, fpext + uitofp, and `long(i) * 3 + 1`: 2 int64 ops.
SCALAR_KERNEL = """
#include <metal_stdlib>
using namespace metal;
kernel void scalar_work(device float* out [[buffer(0)]], device const half* x [[buffer(1)]],
                        constant float& a [[buffer(2)]], uint i [[thread_position_in_grid]],
                        uint lid [[thread_index_in_threadgroup]]) {
  threadgroup float tile[64];
  tile[lid] = float(x[i]);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  long j = long(i) * 3 + 1;
  out[i] = a * tile[63 - lid] + float(j);
}
"""

# Thread t adds x[0..t): t float reads and t fadds, with a 32-bit loop counter (no int64 work).
LOOP_KERNEL = """
#include <metal_stdlib>
using namespace metal;
kernel void prefix_sum(device float* out [[buffer(0)]], device const float* x [[buffer(1)]],
                       uint t [[thread_position_in_grid]]) {
  float acc = 0.0f;
  for (uint k = 0; k < t; ++k) acc += x[k];
  out[t] = acc;
}
"""

# One simdgroup: load A and B (8x8 float) from threadgroup memory, REPS multiply-accumulates, store C.
MMA_KERNEL = """
#include <metal_stdlib>
using namespace metal;
kernel void mma_loop(device float* out [[buffer(0)]], device const float* in [[buffer(1)]],
                     uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float tile[128];
  for (uint e = lane; e < 128; e += 32) tile[e] = in[e];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_float8x8 a, b;
  simdgroup_float8x8 c = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  simdgroup_load(a, tile, 8);
  simdgroup_load(b, tile + 64, 8);
  for (int r = 0; r < REPS; ++r) simdgroup_multiply_accumulate(c, a, b, c);
  simdgroup_store(c, out, 8);
}
"""


def _launch(source, kernel, args, **launch):
    with record_costs() as launches:
        getattr(compile_shader(source), kernel)(*args, **launch)
    assert len(launches) == 1
    return launches[0]


def test_scalar_kernel_counts_are_exact(emulator):
    out, x = torch.zeros(128), torch.randn(128).half()
    c = _launch(SCALAR_KERNEL, "scalar_work", [out, x, 2.0], threads=128, group_size=64)
    per_thread = dict(device_bytes_read=2, device_bytes_written=4, constant_bytes_read=4, threadgroup_bytes_read=4,
                      threadgroup_bytes_written=4, mma_lane_calls=0, float_ops=2, float_conversions=2, int64_ops=2)
    assert {k: c.values[k] for k in per_thread} == {k: 128 * v for k, v in per_thread.items()}
    assert (c["barriers"], c["threadgroups"], c["threads"], c["peak_threadgroup_bytes"]) == (2, 2, 128, 256)
    i = torch.arange(128)
    expected = 2.0 * x.float().view(2, 64).flip(1).reshape(-1) + (3 * i + 1).float()
    torch.testing.assert_close(out, expected)  # a counted build computes the same


def test_loop_counts_follow_the_executed_iterations(emulator):
    n = 40
    out, x = torch.zeros(n), torch.randn(n)
    c = _launch(LOOP_KERNEL, "prefix_sum", [out, x], threads=n, group_size=32)
    iterations = n * (n - 1) // 2
    assert c["device_bytes_read"] == 4 * iterations
    assert c["float_ops"] == iterations
    assert c["device_bytes_written"] == 4 * n
    assert c["int64_ops"] == 0  # a 32-bit counter stays 32-bit (no induction-variable widening)
    assert (c["barriers"], c["threadgroups"], c["peak_threadgroup_bytes"]) == (0, 2, 0)


@pytest.mark.parametrize("reps", [1, 5])
def test_simdgroup_mmas_and_their_operand_traffic(emulator, reps):
    out, inp = torch.zeros(64), torch.randn(128)
    c = _launch(MMA_KERNEL.replace("REPS", str(reps)), "mma_loop", [out, inp], threads=32, group_size=32)
    assert c.simdgroup_mmas == reps and c.mma_flops == reps * 1024
    assert c["threadgroup_bytes_read"] == 2 * 64 * 4  # two 8x8 float fragments, two elements a lane
    assert c["threadgroup_bytes_written"] == c["device_bytes_read"] == 128 * 4
    assert c["device_bytes_written"] == 64 * 4
    assert c["float_ops"] == 0  # the product's FMAs are the MMA's, not counted again
    assert c["simd_collectives"] == reps and c["barriers"] == 1
    a, b = inp[:64].view(8, 8), inp[64:].view(8, 8)
    torch.testing.assert_close(out.view(8, 8), reps * (a @ b))


def test_an_uncounted_build_records_nothing(emulator):
    lib = emulator.compile_shader(LOOP_KERNEL)
    lib.prefix_sum(torch.zeros(4), torch.randn(4), threads=4, group_size=4)
    assert lib.prefix_sum.last_counters is None
    assert not lib.target.counted


def test_counter_names_match_the_runtime():
    assert COUNTERS[: len(COUNTED)] == COUNTED and len(set(COUNTERS)) == len(COUNTERS)


@pytest.mark.parametrize("instruction, expected", [
    ("  %3 = fadd fast <4 x float> %a, %b", {"float_ops": 4}),
    ("  %3 = fcmp olt half %a, %b", {"float_ops": 1}),
    ("  %3 = fptrunc <2 x float> %a to <2 x half>", {"float_conversions": 2}),
    ("  %3 = add nuw nsw i64 %a, 1", {"int64_ops": 1}),
    ("  %3 = add nsw i32 %a, 1", {}),
    ("  %3 = icmp samesign ult i64 %a, %b", {"int64_ops": 1}),
    ("  %3 = tail call float @llvm.exp2.f32(float %a)", {"float_ops": 1}),
    ("  %3 = tail call i64 @llvm.smax.i64(i64 %a, i64 %b)", {"int64_ops": 1}),
    ("  %3 = tail call float @tanhf(float %a)", {"float_ops": 1}),
    ("  %3 = load <4 x half>, ptr addrspace(1) %p, align 8", {"device_bytes_read": 8}),
    ("  %3 = load i64, ptr addrspace(2) %p, align 8", {"constant_bytes_read": 8}),
    ("  %3 = load float, ptr %p, align 4", {}),
    ("  store <2 x half> <half 0xH0000, half 0xH0000>, ptr addrspace(3) %p, align 4", {"threadgroup_bytes_written": 4}),
    ("  %3 = atomicrmw add ptr addrspace(1) %p, i32 1 monotonic, align 4",
     {"device_bytes_read": 4, "device_bytes_written": 4}),
    ("  call void @llvm.memcpy.p3.p1.i64(ptr addrspace(3) align 4 %d, ptr addrspace(1) align 4 %s, i64 16, i1 false)",
     {"device_bytes_read": 16, "threadgroup_bytes_written": 16}),
    ("  call void @mslemu_simd_rendezvous(ptr noundef nonnull @_ZN6mslemu6mma_fnIffffEEvPKPKvPKPvj, ptr %a, ptr %b, "
     "i32 7)", {"mma_lane_calls": 1}),
])
def test_instruction_classification(instruction, expected):
    counts = block_counts([instruction])
    assert {k: v for k, v in counts.items() if v} == expected


def test_hardware_model_code_counts_memory_but_not_alu():
    """Inlined shim code that models a hardware unit (here matrix.h) moves bytes but adds no ALU work."""
    lines = ["!1 = !DIFile(filename: \"/x/include/mslemu/matrix.h\", directory: \"\")",
             "!2 = distinct !DISubprogram(name: \"simdgroup_load\", scope: !1, file: !1, line: 1)",
             "!3 = !DILocation(line: 5, column: 3, scope: !2)"]
    files = DebugFiles(lines)
    counts = block_counts(["  %4 = mul i64 %a, %b, !dbg !3", "  %5 = load float, ptr addrspace(3) %p, !dbg !3"],
                          files=files)
    assert {k: v for k, v in counts.items() if v} == {"threadgroup_bytes_read": 4}
