"""simd-group functions against their definitions, computed in Python."""

import pytest
import torch

SRC = r"""
#include <metal_stdlib>
using namespace metal;
kernel void collectives(device const float* x, device float* out, uint gid [[thread_position_in_grid]],
                        uint lane [[thread_index_in_simdgroup]]) {
  float v = x[gid];
  device float* o = out + gid * 12;
  o[0] = simd_sum(v); o[1] = simd_max(v); o[2] = simd_min(v);
  o[3] = simd_prefix_inclusive_sum(v); o[4] = simd_prefix_exclusive_sum(v);
  o[5] = simd_shuffle(v, (lane * 7) % 32); o[6] = simd_shuffle_up(v, 3); o[7] = simd_shuffle_down(v, 5);
  o[8] = simd_shuffle_xor(v, 9); o[9] = simd_broadcast(v, 4);
  o[10] = simd_broadcast_first(v);
  o[11] = float(simd_ballot(v > 0.0f).any()) + 2.0f * float(simd_all(v > -100.0f)) + 4.0f * float(simd_any(v > 100.0f));
}
kernel void ballot_bits(device ulong* out, device const float* x, uint gid [[thread_position_in_grid]]) {
  out[gid] = ulong(simd_ballot(x[gid] > 0.0f));
}
kernel void masked_sum(device const float* x, device float* out, uint gid [[thread_position_in_grid]],
                       uint lane [[thread_index_in_simdgroup]]) {
  out[gid] = 0.0f;
  if (lane < 10) out[gid] = simd_sum(x[gid]);  // only the active lanes take part
}
kernel void shuffle_tail(device const float* x, device float* out, constant int& columns,
                         uint lane [[thread_index_in_simdgroup]]) {
  // The decode merge's old column loop: at columns = 33 the second pass is lane 0's alone, and it reads lane 31.
  for (int c = int(lane); c < columns; c += 32) out[c] = simd_shuffle(x[lane], ushort(31));
}
kernel void shuffle_tail_uniform(device const float* x, device float* out, constant int& columns,
                                 uint lane [[thread_index_in_simdgroup]]) {
  for (int c0 = 0; c0 < columns; c0 += 32) {  // every lane runs every pass; the tail only skips the store
    const float w = simd_shuffle(x[lane], ushort(31));
    if (c0 + int(lane) < columns) out[c0 + lane] = w;
  }
}
"""


@pytest.fixture(scope="module")
def lib(metal):
    return metal.compile_shader(SRC)


def _expected(x: torch.Tensor) -> torch.Tensor:
    """Per 32-lane group, the definitions of each column of `collectives` (all lanes active)."""
    rows = []
    for g in x.view(-1, 32).double():
        lane = torch.arange(32)
        up = torch.where(lane >= 3, g[(lane - 3).clamp(min=0)], g)
        down = torch.where(lane + 5 < 32, g[(lane + 5).clamp(max=31)], g)
        flags = float((g > 0).any()) + 2 * float((g > -100).all()) + 4 * float((g > 100).any())
        cols = [g.sum().expand(32), g.max().expand(32), g.min().expand(32), g.cumsum(0), g.cumsum(0) - g,
                g[(lane * 7) % 32], up, down, g[lane ^ 9], g[4].expand(32), g[0].expand(32), torch.full((32,), flags)]
        rows.append(torch.stack(cols, 1))
    return torch.cat(rows)


def test_simd_collectives(lib, metal):
    x = torch.randn(128, device=metal.device)
    out = torch.full((128 * 12,), float("nan"), device=metal.device)
    lib.collectives(x, out, group_size=64)
    torch.testing.assert_close(out.cpu().view(128, 12).double(), _expected(x.cpu()), rtol=1e-5, atol=1e-5)


def test_ballot_bits(lib, metal):
    x = torch.randn(64, device=metal.device)
    out = torch.zeros(64, dtype=torch.int64, device=metal.device)
    lib.ballot_bits(out, x, group_size=64)
    for g in range(2):
        bits = sum(1 << l for l in range(32) if x[g * 32 + l] > 0)
        assert set(out.cpu()[g * 32 : (g + 1) * 32].tolist()) == {bits - (1 << 64) if bits >= 1 << 63 else bits}


def test_partial_and_divergent_simdgroups_use_active_lanes_only(lib, metal):
    x = torch.randn(48, device=metal.device)  # second simd-group has 16 lanes
    out = torch.full((48,), float("nan"), device=metal.device)
    lib.masked_sum(x, out, group_size=48)
    xc = x.cpu()
    expected = torch.zeros(48)
    expected[:10] = xc[:10].sum()
    expected[32:42] = xc[32:42].sum()
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("columns", [32, 33, 40, 64])
def test_a_shuffle_from_a_lane_that_is_not_active_is_an_error(lib, metal, columns):
    """Metal leaves the value undefined, so the emulator refuses rather than pick one (it kept the reader's own
    value until session 27, which hid a wrong decode merge at head dims not a multiple of 32)."""
    from mfa_hf.kernels.metal.emulator import EmulatorRuntimeError

    x = torch.randn(32, device=metal.device)
    out = torch.full((columns,), float("nan"), device=metal.device)
    if columns % 32:
        with pytest.raises(EmulatorRuntimeError, match="source lane that is not active"):
            lib.shuffle_tail(x, out, columns, group_size=32, arg_casts={2: "int32"})
    else:
        lib.shuffle_tail(x, out, columns, group_size=32, arg_casts={2: "int32"})
        assert torch.equal(out.cpu(), x.cpu()[31].expand(columns))
    out.fill_(float("nan"))
    lib.shuffle_tail_uniform(x, out, columns, group_size=32, arg_casts={2: "int32"})
    assert torch.equal(out.cpu(), x.cpu()[31].expand(columns))
