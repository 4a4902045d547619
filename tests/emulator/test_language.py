"""MSL language features under the emulator: rounding, vectors, math, literals, templates."""

import math

import pytest
import torch

from mfa_hf.kernels.metal.emulator import MetalCompileError, with_defines

SRC = r"""
#include <metal_stdlib>
using namespace metal;
constant float kOffset = 0.25;

// half and bfloat round after every operation: (x + y) * z is two roundings.
kernel void half_ops(device const half* x, device const half* y, device const half* z, device half* out,
                     uint i [[thread_position_in_grid]]) {
  half s = x[i] + y[i];
  out[i] = s * z[i];
}
kernel void bfloat_ops(device const bfloat* x, device const bfloat* y, device const bfloat* z, device bfloat* out,
                       uint i [[thread_position_in_grid]]) {
  bfloat s = x[i] + y[i];
  out[i] = s * z[i];
}
kernel void vectors(device float* out, device const float4* in, uint i [[thread_position_in_grid]]) {
  float4 v = in[i];
  float4 w = float4(v.zw, 1, 2);          // constructor from a swizzle and scalars
  half4 h = half4(float4(1.5, -2.25, 70000.0, 0.1));  // converts (and rounds), never bit-casts
  int2 k = int2(3);                        // splat
  float2 g = v.xy;
  g.yx = float2(7.0, 8.0);                 // swizzle assignment: y = 7, x = 8
  device float* o = out + i * 12;
  o[0] = w.x; o[1] = w.y; o[2] = w.z; o[3] = w.w;
  o[4] = h.x; o[5] = h.y; o[6] = h.z; o[7] = h.w;
  o[8] = float(k.x + k.y); o[9] = g.x; o[10] = g.y; o[11] = dot(v, float4(1.0));
}
kernel void math_fns(device const float* x, device float* out, uint i [[thread_position_in_grid]]) {
  float v = x[i];
  device float* o = out + i * 10;
  o[0] = metal::exp(v); o[1] = precise::exp(v); o[2] = fast::exp(v); o[3] = log(abs(v) + 1.0);
  o[4] = tanh(v); o[5] = rsqrt(abs(v) + 1.0); o[6] = clamp(v, -0.5f, 0.5f);
  o[7] = select(1.0f, 2.0f, v > 0.0f); o[8] = as_type<float>(as_type<uint>(v) ^ 0x80000000u);
  o[9] = fma(v, v, kOffset);
}
kernel void literals(device const float* x, device float* out, device half* hout, uint i [[thread_position_in_grid]]) {
  out[i] = x[i] * 0.1;        // an unsuffixed literal is a float in MSL (not a double)
  hout[i] = half(x[i]) * 0.1h;  // h suffix: a half literal
}
template <typename T>
kernel void scale_by_two(device T* x [[buffer(0)]], uint i [[thread_position_in_grid]]) { x[i] = x[i] * T(2); }
template [[host_name("scale_float")]] [[kernel]] void scale_by_two<float>(device float*, uint);
template [[host_name("scale_half")]] [[kernel]] decltype(scale_by_two<half>) scale_by_two<half>;
"""


@pytest.fixture(scope="module")
def lib(metal):
    return metal.compile_shader(SRC)


def _rand(n, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 3).to(dtype).to(device)


@pytest.mark.parametrize("dtype, kernel", [(torch.float16, "half_ops"), (torch.bfloat16, "bfloat_ops")])
def test_low_precision_rounds_after_every_operation(lib, metal, dtype, kernel):
    x, y, z = (_rand(4096, dtype, metal.device, s) for s in range(3))
    out = torch.full_like(x, float("nan"))
    getattr(lib, kernel)(x, y, z, out)
    expected = (x.cpu() + y.cpu()) * z.cpu()  # torch CPU rounds each op to the dtype
    assert torch.equal(out.cpu(), expected)
    fused = ((x.cpu().double() + y.cpu().double()) * z.cpu().double()).to(dtype)
    assert not torch.equal(out.cpu(), fused)  # the check can tell single from double rounding


def test_vector_constructors_swizzles_and_conversions(lib, metal):
    inp = torch.tensor([[1.0, 2.0, 3.0, 4.0]], device=metal.device)
    out = torch.full((12,), float("nan"), device=metal.device)
    lib.vectors(out, inp, threads=1)
    half = lambda v: torch.tensor(v, dtype=torch.float16).item()  # noqa: E731
    assert out.cpu().tolist() == [3.0, 4.0, 1.0, 2.0, 1.5, -2.25, math.inf, half(0.1), 6.0, 8.0, 7.0, 10.0]


def test_math_functions(lib, metal):
    x = torch.linspace(-3, 3, 61, device=metal.device)
    out = torch.full((61 * 10,), float("nan"), device=metal.device)
    lib.math_fns(x, out)
    o, xc = out.cpu().view(61, 10).double(), x.cpu().double()
    expected = [xc.exp()] * 3 + [(xc.abs() + 1).log(), xc.tanh(), (xc.abs() + 1).rsqrt(), xc.clamp(-0.5, 0.5),
                                 torch.where(xc > 0, 2.0, 1.0).double(), -xc, xc * xc + 0.25]
    for j, e in enumerate(expected):
        torch.testing.assert_close(o[:, j], e, rtol=2e-6, atol=1e-6, msg=f"column {j}")


def test_literals_are_float_and_half(lib, metal):
    x = _rand(1000, torch.float32, metal.device, 5)
    out, hout = torch.empty_like(x), torch.empty(1000, dtype=torch.float16, device=metal.device)
    lib.literals(x, out, hout)
    assert torch.equal(out.cpu(), x.cpu() * torch.tensor(0.1, dtype=torch.float32))
    assert torch.equal(hout.cpu(), x.cpu().half() * torch.tensor(0.1, dtype=torch.float16))


def test_template_instantiations_by_host_name(lib, metal):
    for name, dtype in [("scale_float", torch.float32), ("scale_half", torch.float16)]:
        x = torch.arange(5, dtype=dtype, device=metal.device)
        getattr(lib, name)(x)
        assert x.cpu().tolist() == [0, 2, 4, 6, 8]


def test_defines_make_variants(metal):
    src = r"""
#include <metal_stdlib>
using namespace metal;
kernel void fill(device float* x, uint i [[thread_position_in_grid]]) { x[i] = VALUE * (USE_INDEX ? float(i) : 1.0f); }
"""
    for defines, expected in [({"VALUE": 2.5, "USE_INDEX": False}, [2.5] * 3), ({"VALUE": 2, "USE_INDEX": True}, [0, 2, 4])]:
        x = torch.zeros(3, device=metal.device)
        metal.compile_shader(with_defines(src, defines)).fill(x)
        assert x.cpu().tolist() == expected
    with pytest.raises(ValueError, match="defines: expected identifier names"):
        with_defines(src, {"BAD NAME": 1})


ADDRESS_SPACE_BUG = r"""#include <metal_stdlib>
using namespace metal;
void helper(threadgroup float* p) { p[0] = 1.0f; }
kernel void k(device float* x, uint i [[thread_position_in_grid]]) {
  helper(x);
}
"""


def test_address_space_mismatch_is_a_compile_error(emulator):
    with pytest.raises(MetalCompileError) as info:
        emulator.compile_shader(ADDRESS_SPACE_BUG)
    message = str(info.value)
    assert "kernel.metal:5:" in message and "MSL line 5: helper(x);" in message
    assert "address space '1' (device)" in message and "address space '3' (threadgroup)" in message


def test_type_names_without_using_namespace(metal):
    src = r"""
#include <metal_stdlib>
kernel void f(device half4* x, uint i [[thread_position_in_grid]]) { x[i] = half4(float4(1, 2, 3, metal::exp(0.0f))); }
"""
    x = torch.zeros(8, dtype=torch.float16, device=metal.device)
    metal.compile_shader(src).f(x, threads=2)
    assert x.cpu().tolist() == [1, 2, 3, 1] * 2
