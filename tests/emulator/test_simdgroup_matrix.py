"""simdgroup_matrix: Apple's lane layout, load/store options, and products against torch."""

import pytest
import torch

from mfa_hf.kernels.metal.emulator import EmulatorRuntimeError

SRC = r"""
#include <metal_stdlib>
using namespace metal;
// Which matrix element each lane's thread_elements() holds, read from a loaded iota matrix.
kernel void lane_layout(device const float* iota, device float* out, uint lane [[thread_index_in_simdgroup]]) {
  simdgroup_float8x8 m;
  simdgroup_load(m, iota, 8);
  out[lane * 2] = m.thread_elements()[0];
  out[lane * 2 + 1] = m.thread_elements()[1];
}
// D = A B + C for 8x8 operands of type T; A read transposed from memory when TRANSPOSE_A.
template <typename T>
kernel void mma(device const T* a [[buffer(0)]], device const T* b [[buffer(1)]], device const float* c [[buffer(2)]],
                device float* d [[buffer(3)]], constant uint& transpose_a [[buffer(4)]], uint lane [[thread_index_in_simdgroup]]) {
  simdgroup_matrix<T, 8, 8> am, bm;
  simdgroup_float8x8 cm, dm;
  simdgroup_load(am, a, 8, ulong2(0), transpose_a != 0);
  simdgroup_load(bm, b, 8);
  simdgroup_load(cm, c, 8);
  simdgroup_multiply_accumulate(dm, am, bm, cm);
  simdgroup_store(dm, d, 8);
}
template [[host_name("mma_float")]] [[kernel]] decltype(mma<float>) mma<float>;
template [[host_name("mma_half")]] [[kernel]] decltype(mma<half>) mma<half>;
template [[host_name("mma_bfloat")]] [[kernel]] decltype(mma<bfloat>) mma<bfloat>;
// Loads/stores an 8x8 block at an origin inside a larger row-major matrix (stride 20).
kernel void block_copy(device const float* src, device float* dst, uint lane [[thread_index_in_simdgroup]]) {
  simdgroup_float8x8 m;
  simdgroup_load(m, src, 20, ulong2(3, 5));
  simdgroup_store(m, dst, 20, ulong2(11, 1), true);
}
// Writes the product through thread_elements() assuming a WRONG (row-major) lane layout.
kernel void wrong_layout(device const float* a, device const float* b, device float* d,
                         uint lane [[thread_index_in_simdgroup]]) {
  simdgroup_float8x8 am, bm, dm;
  simdgroup_load(am, a, 8);
  simdgroup_load(bm, b, 8);
  simdgroup_multiply(dm, am, bm);
  uint row = lane / 4, col = (lane % 4) * 2;
  d[row * 8 + col] = dm.thread_elements()[0];
  d[row * 8 + col + 1] = dm.thread_elements()[1];
}
kernel void mma_with_exited_lanes(device const float* a, device float* d, uint lane [[thread_index_in_simdgroup]]) {
  if (lane == 31) return;
  simdgroup_float8x8 am, dm;
  simdgroup_load(am, a, 8);
  simdgroup_multiply(dm, am, am);
  simdgroup_store(dm, d, 8);
}
"""


@pytest.fixture(scope="module")
def lib(metal):
    return metal.compile_shader(SRC)


def test_thread_elements_follow_apple_lane_layout(lib, metal):
    iota = torch.arange(64, dtype=torch.float32, device=metal.device)
    out = torch.full((64,), float("nan"), device=metal.device)
    lib.lane_layout(iota, out, threads=32, group_size=32)
    expected = []
    for lane in range(32):  # MLX BaseMMAFrag::get_coord
        row = ((lane // 4) & 4) + (lane // 2) % 4
        col = ((lane // 4) & 2) * 2 + (lane % 2) * 2
        expected += [row * 8 + col, row * 8 + col + 1]
    assert out.cpu().tolist() == expected


@pytest.mark.parametrize("name, dtype", [("mma_float", torch.float32), ("mma_half", torch.float16), ("mma_bfloat", torch.bfloat16)])
@pytest.mark.parametrize("transpose_a", [False, True])
def test_multiply_accumulate_matches_torch(lib, metal, name, dtype, transpose_a):
    g = torch.Generator().manual_seed(7)
    a, b = (torch.randn(8, 8, generator=g).to(dtype) for _ in range(2))
    c = torch.randn(8, 8, generator=g)
    d = torch.full((8, 8), float("nan"))
    getattr(lib, name)(*(t.to(metal.device) for t in (a.t().contiguous() if transpose_a else a, b, c)),
                       dout := d.to(metal.device), int(transpose_a), threads=32, group_size=32, arg_casts={4: "int32"})
    expected = a.double() @ b.double() + c.double()
    torch.testing.assert_close(dout.cpu().double(), expected, rtol=1e-5, atol=1e-5)


def test_load_store_with_stride_origin_and_transpose(lib, metal):
    src = torch.randn(20 * 20, device=metal.device)
    dst = torch.zeros(20 * 20, device=metal.device)
    lib.block_copy(src, dst, threads=32, group_size=32)
    block = src.cpu().view(20, 20)[5:13, 3:11]
    expected = torch.zeros(20, 20)
    expected[1:9, 11:19] = block.t()
    assert torch.equal(dst.cpu().view(20, 20), expected)


def test_wrong_lane_layout_assumption_is_caught(lib, emulator):
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    d = torch.zeros(8, 8)
    lib.wrong_layout(a, b, d, threads=32, group_size=32)
    error = (d.double() - a.double() @ b.double()).abs().max().item()
    assert error > 0.5, "a kernel assuming a row-major lane layout must produce a wrong product"


def test_multiply_needs_all_32_lanes(lib, emulator):
    with pytest.raises(EmulatorRuntimeError, match="all 32 lanes of the simd-group must take part"):
        lib.mma_with_exited_lanes(torch.randn(64), torch.zeros(64), threads=32, group_size=32)
