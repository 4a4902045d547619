"""Independent validation of the emulator: MLX's Metal kernels, which run on real Macs, against float64.

MLX's headers come from PyPI's mlx-metal wheel at test time (kernels/metal/emulator/mlx_wheel.py:
pinned SHA-256, private cache); mlx_source.py assembles one MSL source from them, setting the
function constants MLX's host code would set. Launches follow MLX's host code
(mlx/backend/metal/scaled_dot_product_attention.cpp): same grids, threadgroup sizes and buffer
order, and the host names of MLX's metallib. Every launch runs under the `forward` and `sg-random`
schedules and must give bitwise-equal outputs (run_two_schedules).

Max abs errors against float64 measured here (clang 19, x86; recorded in the emulator README):
sdpa_vector float32 1.3e-7; sdpa_vector 2-pass float32 2.4e-7; 8x32x8 BaseMMAFrag GEMM 1.1e-6;
steel attention (D=64, BQ=32 BK=32 WM=4 WN=1) float32 5.4e-7 / float16 2.4e-4 / bfloat16 3.9e-3,
causal and ragged included, each within 2x PyTorch's own error in that dtype plus a floor (slow:
D=256 WN=2, float16 4.5e-4 / bfloat16 3.3e-3). The float32 decode and GEMM bounds are fixed at
about 4x the measured error (PyTorch's float32 error plus the floor would be looser).
No download: set MFA_MLX_METAL_OFFLINE=1 to skip (otherwise these tests fail, never skip).
"""

from __future__ import annotations

import math

import pytest
import torch

from mfa_hf.kernels.metal.emulator import run_two_schedules
from mfa_hf.kernels.metal.emulator.mlx_launch import SteelBlocks, kv_strides, sdpa_vector_constants, \
    steel_attention_launch, steel_attention_source
from mfa_hf.kernels.metal.emulator.mlx_source import assemble

FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
SDPA_VECTOR_CONSTANTS = sdpa_vector_constants(blocks=32)


def _inputs(b, h, h_kv, q_len, k_len, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, q_len, d, generator=g).to(dtype)
    k, v = (torch.randn(b, h_kv, k_len, d, generator=g).to(dtype) for _ in range(2))
    return q, k, v


def _reference(q, k, v, scale, causal=False, dtype=torch.float64):
    """softmax(q k^T * scale) v in `dtype`, GQA by index, causal aligned bottom-right."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.to(dtype), k.to(dtype).repeat_interleave(group, 1), v.to(dtype).repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        q_len, k_len = s.shape[-2:]
        s = s.masked_fill(torch.ones(q_len, k_len, dtype=torch.bool).triu(k_len - q_len + 1), -math.inf)
    return torch.softmax(s, -1) @ v


def _max_error(out, q, k, v, scale, causal=False):
    return (out.double() - _reference(q, k, v, scale, causal)).abs().max().item()


def _tolerance(q, k, v, scale, causal):
    """DESIGN.md's rule: 2x PyTorch's own error in the input dtype, plus a floor."""
    torch_error = _max_error(_reference(q, k, v, scale, causal, dtype=q.dtype), q, k, v, scale, causal)
    return 2 * torch_error + FLOOR[q.dtype]


# ---------------------------------------------------------------------------------------------
# sdpa_vector (decode): one threadgroup of 32 simd-groups per query row


@pytest.fixture(scope="module")
def sdpa_vector_lib(emulator, mlx_dir):
    kernels = ['instantiate_kernel("sdpa_vector_float_64_64", sdpa_vector, float, 64, 64)',
               'instantiate_kernel("sdpa_vector_2pass_1_float_64_64", sdpa_vector_2pass_1, float, 64, 64)',
               'instantiate_kernel("sdpa_vector_2pass_2_float_64", sdpa_vector_2pass_2, float, 64)']
    return emulator.compile_shader(assemble(mlx_dir, ["utils.h", "sdpa_vector.h"], SDPA_VECTOR_CONSTANTS, kernels))


def test_sdpa_vector_float32(sdpa_vector_lib):
    """MLX sdpa_vector, float32, D=64, GQA 4:2, 100 keys (not a multiple of 32): max error 1.3e-7."""
    b, h, h_kv, k_len, d = 1, 4, 2, 100, 64
    q, k, v = _inputs(b, h, h_kv, 1, k_len, d, torch.float32, seed=0)
    out = torch.full_like(q, float("nan"))
    scale = 1 / math.sqrt(d)
    args = [q, k, v, out, h // h_kv, k_len, *kv_strides(k), *kv_strides(v), scale]
    run_two_schedules(sdpa_vector_lib, "sdpa_vector_float_64_64", args, outputs=[out],
                      threads=(b * h * 1024, 1, 1), group_size=(1024, 1, 1), arg_casts={4: "int32", 5: "int32"})
    error = _max_error(out, q, k, v, scale)
    assert error < 5e-7, error


def test_sdpa_vector_2pass_float32(sdpa_vector_lib):
    """MLX sdpa_vector_2pass_1 + _2 (blocks=32), float32, D=64, GQA 4:2, 2 queries, 300 keys:
    max error 2.4e-7."""
    b, h, h_kv, q_len, k_len, d, blocks = 1, 4, 2, 2, 300, 64, SDPA_VECTOR_CONSTANTS["blocks"]
    q, k, v = _inputs(b, h, h_kv, q_len, k_len, d, torch.float32, seed=1)
    scale = 1 / math.sqrt(d)
    partials = torch.full((b, h, q_len, blocks, d), float("nan"))
    sums, maxs = (torch.full((b, h, q_len, blocks), float("nan")) for _ in range(2))
    unbound = torch.zeros(1, dtype=torch.uint8)  # buffer 6: MLX's 2-pass kernel has none
    gqa = h // h_kv
    args = [q, k, v, partials, sums, maxs, unbound, k_len, *kv_strides(k), *kv_strides(v), scale]
    run_two_schedules(sdpa_vector_lib, "sdpa_vector_2pass_1_float_64_64", args, outputs=[partials, sums, maxs],
                      threads=(h_kv * 32, b * gqa, blocks * q_len), group_size=(32, gqa, q_len),
                      arg_casts={7: "int32"})
    out = torch.full_like(q, float("nan"))
    run_two_schedules(sdpa_vector_lib, "sdpa_vector_2pass_2_float_64", [partials, sums, maxs, out, blocks],
                      outputs=[out], threads=(b * h * 1024, q_len, 1), group_size=(1024, 1, 1),
                      arg_casts={4: "int32"})
    error = _max_error(out, q, k, v, scale)
    assert error < 1e-6, error


# ---------------------------------------------------------------------------------------------
# steel GEMM fragments: BaseMMAFrag / MMATile / tile_matmad from steel/gemm/mma.h

# Test code (ours), built on MLX's templates: one simd-group computes C = A (8x32) . B (32x8).
MMA_GEMM = """
template <typename T>
[[kernel]] void mlx_mma_gemm(const device T* A [[buffer(0)]], const device T* B [[buffer(1)]],
                             device float* C [[buffer(2)]], uint lane [[thread_index_in_simdgroup]]) {
  using namespace mlx::steel;
  const short2 xy = BaseMMAFrag<float, 8, 8>::get_coord(lane);  // x: column, y: row of this lane
  MMATile<float, 1, 4> a;
  MMATile<float, 4, 1> b;
  MMATile<float, 1, 1> c;
  a.template load<T, 1, 1>(A + xy.y * 32 + xy.x, 32);
  b.template load<T, 1, 1>(B + xy.y * 8 + xy.x, 8);
  tile_matmad(c, a, b, c);
  c.template store<float, 1, 1>(C + xy.y * 8 + xy.x, 8);
}
"""


def test_steel_mma_gemm_8x32x8(emulator, mlx_dir):
    """MLX's steel MMATile/BaseMMAFrag (simdgroup_matrix 8x8, Apple's lane layout), float32: max error 1.1e-6."""
    source = assemble(mlx_dir, ["utils.h", "steel/gemm/mma.h"], {}, [
        'instantiate_kernel("mlx_mma_gemm_float", mlx_mma_gemm, float)'], epilogue=MMA_GEMM)
    lib = emulator.compile_shader(source)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(8, 32, generator=g), torch.randn(32, 8, generator=g)
    c = torch.full((8, 8), float("nan"))
    run_two_schedules(lib, "mlx_mma_gemm_float", [a, b, c], outputs=[c], threads=32, group_size=32)
    error = (c.double() - a.double() @ b.double()).abs().max().item()
    assert error < 4e-6, error


# ---------------------------------------------------------------------------------------------
# steel attention (prefill): steel/attn/kernels/steel_attention.h, MMAs on simdgroup matrices


def _run_steel_attention(runtime, mlx_dir, dtype, b, h, h_kv, q_len, k_len, d, causal, seed, bk=32, wn=1):
    blocks = SteelBlocks(32, bk, 4, wn)
    source, name = steel_attention_source(mlx_dir, dtype, d, blocks, q_len % blocks.bq == 0, k_len % bk == 0, causal)
    lib = runtime.compile_shader(source)
    q, k, v = _inputs(b, h, h_kv, q_len, k_len, d, dtype, seed)
    out = torch.full_like(q, float("nan"))
    scale = 1 / math.sqrt(d)
    args, launch = steel_attention_launch(q, k, v, out, scale, blocks)
    run_two_schedules(lib, name, args, outputs=[out], **launch)
    return _max_error(out, q, k, v, scale, causal), _tolerance(q, k, v, scale, causal)


STEEL_CASES = [  # dtype, b, h, h_kv, q_len, k_len, causal
    pytest.param(torch.float16, 1, 2, 1, 77, 77, False, id="fp16-ragged77"),
    pytest.param(torch.float16, 1, 2, 1, 40, 100, True, id="fp16-causal-40x100"),
    pytest.param(torch.bfloat16, 1, 2, 1, 77, 77, True, id="bf16-causal-ragged77"),
    pytest.param(torch.bfloat16, 1, 2, 2, 64, 64, False, id="bf16-aligned64"),
    pytest.param(torch.float32, 1, 2, 1, 77, 77, True, id="fp32-causal-ragged77"),
    pytest.param(torch.float32, 1, 2, 1, 33, 70, False, id="fp32-33x70"),
]


@pytest.mark.parametrize("dtype, b, h, h_kv, q_len, k_len, causal", STEEL_CASES)
def test_steel_attention(emulator, mlx_dir, dtype, b, h, h_kv, q_len, k_len, causal):
    """MLX steel attention, D=64 (BQ=32 BK=32 WM=4 WN=1, as MLX's host picks for D < 128): max error
    float32 5.4e-7, float16 2.4e-4, bfloat16 3.9e-3, each within 2x PyTorch's error + floor."""
    error, tolerance = _run_steel_attention(emulator, mlx_dir, dtype, b, h, h_kv, q_len, k_len, 64, causal, seed=q_len)
    assert error <= tolerance, (error, tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_steel_attention_d256_split(emulator, mlx_dir, dtype, causal):
    """D=256 with WN=2 (BK=32: Q in registers, half/bfloat MMAs, scores exchanged through
    threadgroup memory), ragged lengths: max error float16 4.5e-4, bfloat16 3.3e-3 (about 4 s each)."""
    error, tolerance = _run_steel_attention(emulator, mlx_dir, dtype, 1, 1, 1, 45, 70, 256, causal, seed=5, wn=2)
    assert error <= tolerance, (error, tolerance)
