"""Library names and language forms MLX's kernels needed, now in the emulator where Metal has
them: array parameters in an address space, <metal_logging>, numeric_limits<signed char>,
simd_shuffle_and_fill_up/down, the metal:: type traits, and fast::/precise:: lookup that a
source's own overload (MLX's fast::exp(bfloat)) does not hijack."""

import pytest
import torch

from mfa_hf.kernels.metal.emulator import MetalCompileError, emulate


def test_address_space_array_parameters_are_pointers(metal):
    src = r"""
#include <metal_stdlib>
using namespace metal;
int64_t offset(constant const int64_t strides[2], uint2 pos) { return pos.x * strides[1] + pos.y * strides[0]; }
float corner(const device float grid[2][3]) { return grid[1][2]; }
kernel void gather(device float* out [[buffer(0)]], const device float* in [[buffer(1)]],
                   constant int64_t* strides [[buffer(2)]],
                   uint2 pos [[thread_position_in_grid]]) {
  out[pos.y * 4 + pos.x] = in[offset(strides, pos)] + corner((const device float (*)[3])in);
}
"""
    lib = metal.compile_shader(src)
    x = torch.arange(16, dtype=torch.float32, device=metal.device)
    out = torch.zeros(16, device=metal.device)
    lib.gather(out, x, [1, 4], threads=(4, 4), group_size=(4, 4))
    expected = torch.arange(16, dtype=torch.float32).reshape(4, 4).t().reshape(-1) + 5.0
    assert torch.equal(out.cpu(), expected)


def test_metal_logging_header_and_os_log(emulator):
    src = r"""
#include <metal_stdlib>
#include <metal_logging>
using namespace metal;
kernel void k(device float* x, uint i [[thread_position_in_grid]]) {
  os_log logger("mfa", "test");
  logger.log_debug("i=%u", i);
  x[i] = 1.0f;
}
"""
    lib = emulator.compile_shader(src)
    x = torch.zeros(4)
    lib.k(x, threads=4)
    assert torch.equal(x, torch.ones(4))
    with emulate(macos="14"), pytest.raises(MetalCompileError, match=r"os_log"):  # MSL 3.1: no os_log
        emulator.compile_shader(src)


def test_signed_char_limits_and_type_traits(emulator):
    src = r"""
#include <metal_stdlib>
using namespace metal;
static_assert(numeric_limits<int8_t>::max() == 127 && numeric_limits<int8_t>::lowest() == -128, "");
static_assert(metal::is_floating_point_v<half> && metal::is_floating_point_v<bfloat>, "");
static_assert(!metal::is_floating_point_v<int> && metal::is_integral_v<short>, "");
static_assert(metal::is_signed_v<half> && metal::is_unsigned_v<uint> && !metal::is_signed_v<uint>, "");
static_assert(metal::is_same_v<metal::remove_addrspace_t<device float>, float>, "");
static_assert(metal::is_same_v<metal::make_unsigned_t<int>, uint>, "");
template <class T, metal::enable_if_t<metal::is_scalar_v<T>, int> = 0> T twice(T v) { return v + v; }
kernel void k(device char* out, uint i [[thread_position_in_grid]]) {
  out[i] = twice(numeric_limits<int8_t>::max() / 2 - int8_t(i));
}
"""
    lib = emulator.compile_shader(src)
    out = torch.zeros(2, dtype=torch.int8)
    lib.k(out, threads=2)
    assert out.tolist() == [126, 124]


def test_simd_shuffle_and_fill(emulator):
    src = r"""
#include <metal_stdlib>
using namespace metal;
kernel void k(device float* down [[buffer(0)]], device float* up [[buffer(1)]], uint l [[thread_index_in_simdgroup]]) {
  float data = float(l), filling = 100.0f + float(l);
  down[l] = simd_shuffle_and_fill_down(data, filling, ushort(3), ushort(8));
  up[l] = simd_shuffle_and_fill_up(data, filling, ushort(3));
}
"""
    lib = emulator.compile_shader(src)
    down, up = torch.zeros(32), torch.zeros(32)
    lib.k(down, up, threads=32, group_size=32)
    lanes = range(32)
    expected_down = [l + 3 if l % 8 + 3 < 8 else 100 + l - l % 8 + (l % 8 + 3 - 8) for l in lanes]
    expected_up = [l - 3 if l >= 3 else 100 + l + 32 - 3 for l in lanes]
    assert down.tolist() == expected_down and up.tolist() == expected_up


@pytest.mark.parametrize("space", ["fast", "precise"])
def test_own_overload_in_fast_does_not_hide_the_float_functions(emulator, space):
    """A source declaring fast::exp(bfloat), as MLX's bf16_math.h does: fast::exp on a float must
    still be the float function, not a silent round trip through bfloat."""
    src = rf"""
#include <metal_stdlib>
using namespace metal;
namespace metal {{ namespace {space} {{
inline bfloat exp(bfloat x) {{ return bfloat(::metal::exp(float(x))); }}
inline bfloat max3(bfloat a, bfloat b, bfloat c) {{ return bfloat(::metal::fmax3(float(a), float(b), float(c))); }}
inline bfloat erf(bfloat x) {{ return bfloat(::metal::erf(float(x))); }}
inline bfloat saturate(bfloat x) {{ return bfloat(::metal::saturate(float(x))); }}
}} }}
kernel void k(device float* out, const device float* in, uint i [[thread_position_in_grid]]) {{
  float x = in[i];
  out[i] = {space}::exp(x) + {space}::max3(x, 0.0f, -1.0f) + {space}::tanh(x) + {space}::erf(x)
           + {space}::saturate(x * 0.3f);
}}
"""
    lib = emulator.compile_shader(src)
    x = torch.linspace(-2.0, 2.0, 37)
    out = torch.zeros_like(x)
    lib.k(out, x)
    expected = (torch.exp(x) + torch.clamp(x, min=0.0) + torch.tanh(x) + torch.erf(x)
                + torch.clamp(x * 0.3, 0.0, 1.0))
    torch.testing.assert_close(out, expected, rtol=2e-7, atol=1e-6)
