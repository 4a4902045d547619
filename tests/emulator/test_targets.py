"""The emulated (macOS, torch) target: MSL version (bfloat from 3.1) and fast math, as torch's
MetalShaderLibrary::compileLibrary chooses them."""

import pytest
import torch

from mfa_hf.kernels.metal.emulator import (MetalCompileError, bfloat_available, compiler, current_target, emulate,
                                           msl_version_for)


@pytest.mark.parametrize("macos, torch_version, expected", [
    ("13.6.1", "2.7.1", "3.0"), ("13.0", "2.8.0", "3.0"), ("14.5", "2.8.0", "3.1"), ("15.3", "2.10.0", "3.1"),
    ("14.7", "2.11.0", "3.1"), ("15.1", "2.11.0", "3.2"), ("15.6", "2.13.0+cpu", "3.2"), ("26.0", "2.13.0", "4.0"),
    ("26.1", "2.10.1", "3.1"), ("15.0", "2.12.0.dev20260301", "3.2"),
])
def test_msl_version_rule(macos, torch_version, expected):
    assert msl_version_for(macos, torch_version) == expected


def test_bfloat_from_msl_3_1():
    assert [bfloat_available(v) for v in ("3.0", "3.1", "3.2", "4.0")] == [False, True, True, True]


def test_target_from_environment_and_context(monkeypatch):
    monkeypatch.setenv("MSLEMU_MACOS", "13.6")
    monkeypatch.setenv("MSLEMU_TORCH", "2.8.0")
    monkeypatch.delenv("PYTORCH_MPS_FAST_MATH", raising=False)
    assert (current_target().msl_version, current_target().fast_math) == ("3.0", False)
    monkeypatch.setenv("PYTORCH_MPS_FAST_MATH", "1")
    assert current_target().fast_math
    monkeypatch.setenv("PYTORCH_MPS_FAST_MATH", "0")  # torch: set and not "0"
    assert not current_target().fast_math
    with emulate(macos="26", torch="2.13", fast_math=True) as target:
        assert (target.msl_version, current_target().fast_math) == ("4.0", True)
        with emulate(fast_math=False):
            assert current_target() == type(target)("26", "2.13", False)
    assert current_target().msl_version == "3.0"
    monkeypatch.setenv("MSLEMU_MACOS", "sonoma")
    with pytest.raises(ValueError, match=r"macos: expected a version like"):
        current_target()


VERSION = """#include <metal_stdlib>
using namespace metal;
kernel void version(device int* out, uint i [[thread_position_in_grid]]) {
#if __HAVE_BFLOAT__
  out[i] = __METAL_VERSION__ + 1;  // +1 marks "bfloat available"
#else
  out[i] = __METAL_VERSION__;
#endif
}
"""


@pytest.mark.parametrize("macos, torch_version, expected", [("13", "2.8", 300), ("14", "2.8", 311), ("15", "2.13", 321),
                                                            ("26", "2.13", 401)])
def test_compile_sees_the_target_version(emulator, macos, torch_version, expected):
    with emulate(macos=macos, torch=torch_version):
        lib = emulator.compile_shader(VERSION)
    out = torch.zeros(1, dtype=torch.int32)
    lib.version(out)
    assert out.item() == expected and lib.msl_version == msl_version_for(macos, torch_version)


@pytest.mark.parametrize("use", ["device bfloat* out", "device bfloat4* out", "device float* out, device half* h"])
def test_bfloat_does_not_exist_under_msl_3_0(emulator, use):
    body = "simdgroup_bfloat8x8 m;" if "half" in use else ""
    src = f"#include <metal_stdlib>\nusing namespace metal;\nkernel void k({use}) {{ {body} }}\n"
    with emulate(macos="13", torch="2.8"), pytest.raises(MetalCompileError, match=r"(?s)bfloat.*needs MSL 3\.1.*macOS 13"):
        emulator.compile_shader(src)
    with emulate(macos="14", torch="2.8"):
        emulator.compile_shader(src)


def test_target_is_part_of_the_cache_key(emulator):
    with emulate(macos="13", torch="2.8"):
        old, _ = compiler.build(VERSION)
    with emulate(macos="15", torch="2.13", fast_math=False):
        safe, _ = compiler.build(VERSION)
    with emulate(macos="15", torch="2.13", fast_math=True):
        fast, _ = compiler.build(VERSION)
    assert len({old, safe, fast}) == 3


# Fast math: a masked online softmax. INF_STYLE uses -INFINITY as "nothing seen yet" and tests
# `m == -INFINITY`; finite math lets the compiler fold that test away (exp(-inf - -inf) = NaN).
# MLX_STYLE keeps every value finite and skips hidden keys with an explicit visibility test.
SOFTMAX = """#include <metal_stdlib>
using namespace metal;
kernel void softmax(device const float* x, device const uchar* visible, device float* out, constant uint& n,
                    uint row [[thread_position_in_grid]]) {
  device const float* xr = x + row * n;
  device const uchar* vr = visible + row * n;
  float m = START, l = 0.0f;
  for (uint j = 0; j < n; ++j) {
    UPDATE
  }
  for (uint j = 0; j < n; ++j) out[row * n + j] = (vr[j] && l > 0.0f) ? exp(xr[j] - m) / l : 0.0f;
}
"""
INF_STYLE = SOFTMAX.replace("START", "-INFINITY").replace("UPDATE", """float s = vr[j] ? xr[j] : -INFINITY;
    float m_new = max(m, s);
    float m_safe = m_new == -INFINITY ? 0.0f : m_new;
    l = l * exp(m - m_safe) + exp(s - m_safe);
    m = m_new;""")
MLX_STYLE = SOFTMAX.replace("START", "-FLT_MAX").replace("UPDATE", """if (!vr[j]) continue;
    float m_new = max(m, xr[j]);
    l = l * exp(m - m_new) + exp(xr[j] - m_new);
    m = m_new;""")


def _softmax_case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g)
    visible = torch.ones(4, 6, dtype=torch.uint8)
    visible[0, :3] = 0  # hidden keys first: the running max is still "nothing seen"
    visible[1, 1] = 0
    visible[2] = 0  # a row with no visible key: 0
    ref = torch.softmax(x.masked_fill(visible == 0, float("-inf")), dim=-1).nan_to_num(0.0)
    return x, visible, ref


def _run_softmax(emulator, source, fast_math):
    x, visible, ref = _softmax_case()
    out = torch.full_like(x, 7.0)
    with emulate(fast_math=fast_math):
        lib = emulator.compile_shader(source)
    assert lib.fast_math is fast_math
    lib.softmax(x, visible, out, 6, threads=4, arg_casts={3: "int32"})
    return out, ref


def test_inf_reliant_softmax_is_right_without_fast_math(emulator):
    out, ref = _run_softmax(emulator, INF_STYLE, False)
    torch.testing.assert_close(out, ref)


def test_inf_reliant_softmax_goes_wrong_under_fast_math(emulator):
    out, ref = _run_softmax(emulator, INF_STYLE, True)
    assert not torch.allclose(out.nan_to_num(123.0), ref), "finite math should have broken the -INFINITY tests"


@pytest.mark.parametrize("fast_math", [False, True])
def test_finite_running_max_stays_right_under_fast_math(emulator, fast_math):
    out, ref = _run_softmax(emulator, MLX_STYLE, fast_math)
    torch.testing.assert_close(out, ref)


def test_fast_math_from_torch_environment_variable(emulator, monkeypatch):
    monkeypatch.setenv("PYTORCH_MPS_FAST_MATH", "1")
    x, visible, ref = _softmax_case()
    out = torch.zeros_like(x)
    lib = emulator.compile_shader(INF_STYLE)
    lib.softmax(x, visible, out, 6, threads=4, arg_casts={3: "int32"})
    assert lib.fast_math and not torch.allclose(out.nan_to_num(123.0), ref)
