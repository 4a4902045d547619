"""[[max_total_threads_per_threadgroup(N)]]: the kernel object reports min(N, 1024) as torch's does
(the pipeline's maxTotalThreadsPerThreadgroup), the default group_size follows it, and a wider
threadgroup is refused (Metal's validation refuses it; torch does not check)."""

import pytest
import torch

from mfa_hf.kernels.metal.emulator import KernelSourceError, MetalCompileError

SRC = r"""
#include <metal_stdlib>
using namespace metal;
#define MFA_WM 4
#define THREADS (32 * MFA_WM)
[[kernel, max_total_threads_per_threadgroup(THREADS)]] void in_list(device float* x, uint i [[thread_position_in_grid]]) {
  x[i] += 1.0f;
}
[[max_total_threads_per_threadgroup(64)]] kernel void before(device float* x, uint i [[thread_position_in_grid]]) {
  x[i] += 1.0f;
}
kernel void after(device float* x, uint i [[thread_position_in_grid]]) [[max_total_threads_per_threadgroup(96)]] {
  x[i] += 1.0f;
}
[[kernel, max_total_threads_per_threadgroup(64)]] void group_shape(device uint* out, uint2 g [[threads_per_threadgroup]]) {
  out[0] = g.x; out[1] = g.y;
}
kernel void plain(device float* x, uint i [[thread_position_in_grid]]) { x[i] += 1.0f; }
[[kernel, max_total_threads_per_threadgroup(4096)]] void huge(device float* x, uint i [[thread_position_in_grid]]) {
  x[i] += 1.0f;
}
namespace ns {
template <typename T, int WM, int WN = 2>
[[kernel, max_total_threads_per_threadgroup(WM * WN * 32)]] void tiled(
    device T* x, uint i [[thread_position_in_grid]]) {
  x[i] += T(WM);
}
}  // namespace ns
template [[host_name("tiled_1")]] [[kernel]] decltype(ns::tiled<float, 1>) ns::tiled<float, 1>;
template [[host_name("tiled_4x4")]] [[kernel]] void ns::tiled<float, 4, 4>(device float*, uint);
"""


@pytest.fixture(scope="module")
def lib():
    from mfa_hf.kernels.metal.emulator import compile_shader

    return compile_shader(SRC)


def test_declared_limit_is_reported_in_every_form(lib):
    reported = {name: getattr(lib, name).max_threads_per_threadgroup
                for name in ["in_list", "before", "after", "plain", "huge", "tiled_1", "tiled_4x4"]}
    assert reported == {"in_list": 128, "before": 64, "after": 96, "plain": 1024, "huge": 1024,
                        "tiled_1": 64, "tiled_4x4": 512}


def test_launch_wider_than_the_limit_is_refused(lib):
    x = torch.zeros(256)
    with pytest.raises(ValueError, match=r"at most 128 threads per threadgroup .*max_total_threads_per_threadgroup\(128\).*"
                                         r"got \(256,\) = 256"):
        lib.in_list(x, threads=256, group_size=256)
    with pytest.raises(ValueError, match=r"at most 64 threads"):
        lib.tiled_1(x, threads=(16, 16), group_size=(16, 8))
    lib.in_list(x, threads=256, group_size=128)
    lib.plain(x, threads=256, group_size=256)
    assert torch.equal(x, torch.full((256,), 2.0))


def test_default_group_size_follows_the_limit(lib):
    x = torch.zeros(256)
    lib.tiled_1(x)  # 1-D default: min(threads, 64), not 256
    assert torch.equal(x, torch.ones(256))
    shape = torch.zeros(2, dtype=torch.int32)
    lib.group_shape(shape, threads=(128, 4))  # n-D default: (64, 1), not (1024, 1)
    assert shape.tolist() == [64, 1]


@pytest.mark.parametrize("value, error, message", [
    ("0", MetalCompileError, r"N must be a positive integer"),
    ("runtime_value", MetalCompileError, r"must be initialized by a constant expression"),
    ("", KernelSourceError, r"needs a value"),
])
def test_invalid_limits_are_compile_errors(emulator, value, error, message):
    src = ("#include <metal_stdlib>\nint runtime_value = 3;\n"
           f"[[kernel, max_total_threads_per_threadgroup({value})]] void k(device float* x) {{ x[0] = 1.0f; }}\n")
    with pytest.raises(error, match=message):
        emulator.compile_shader(src)


def test_declared_twice_is_an_error(emulator):
    src = ("#include <metal_stdlib>\n[[max_total_threads_per_threadgroup(32)]] [[kernel, max_total_threads_per_threadgroup(64)]] "
           "void k(device float* x) { x[0] = 1.0f; }\n")
    with pytest.raises(KernelSourceError, match=r"declares max_total_threads_per_threadgroup 2 times"):
        emulator.compile_shader(src)
