"""Reference kernels (kernels/metal/emulator/examples) through the runtime, against torch."""

import math

import pytest
import torch

from mfa_hf.kernels.metal.emulator import run_two_schedules, with_defines


@pytest.fixture(scope="module")
def matmul_lib(metal, example_source):
    return metal.compile_shader(example_source("tiled_matmul.metal"))


@pytest.mark.parametrize("name, dtype, tol", [("matmul_float", torch.float32, 1e-4), ("matmul_half", torch.float16, 2e-2),
                                              ("matmul_bfloat", torch.bfloat16, 1.5e-1)])
def test_tiled_matmul(matmul_lib, metal, name, dtype, tol):
    m, n, k = 50, 70, 40  # ragged against the 32x32 tiles and depth 16
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    c = torch.full((m, n), float("nan"), dtype=dtype)
    args = [a.to(metal.device), b.to(metal.device), cd := c.to(metal.device),
            torch.tensor([m, n, k, 0], dtype=torch.int32, device=metal.device)]
    run_two_schedules(matmul_lib, name, args, threads=(128 * math.ceil(n / 32), math.ceil(m / 32)), group_size=(128, 1))
    expected = a.double() @ b.double()
    assert (cd.cpu().double() - expected).abs().max().item() < tol


def test_threadgroup_tree_reduction(matmul_lib, metal):
    x = torch.randn(6, 1000, device=metal.device)
    out = torch.full((6,), float("nan"), device=metal.device)
    run_two_schedules(matmul_lib, "row_sums", [x, out, 1000], threads=256 * 6, group_size=256, arg_casts={2: "int32"})
    torch.testing.assert_close(out.cpu().double(), x.cpu().double().sum(1), rtol=1e-5, atol=1e-4)


def _attention(lib, metal, b, h, n, d, causal=False, schedules=True):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(b, h, n, d, generator=g).half() for _ in range(3))
    out = torch.full_like(q, float("nan")).to(metal.device)
    args = [q.to(metal.device), k.to(metal.device), v.to(metal.device), out, n, 1 / math.sqrt(d)]
    launch = dict(threads=(128 * math.ceil(n / 32), b * h), group_size=(128, 1), arg_casts={4: "int32"})
    if schedules:
        run_two_schedules(lib, "flash_attention_mma", args, outputs=[out], **launch)
    else:
        getattr(lib, "flash_attention_mma")(*args, **launch)
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(d)
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    return (out.cpu().double() - torch.softmax(s, -1) @ v.double()).abs().max().item()


@pytest.mark.parametrize("b, h, n, causal", [(1, 2, 256, False), (2, 3, 77, True), (1, 1, 40, False)])
def test_flash_attention_matches_float64(metal, example_source, b, h, n, causal):
    lib = metal.compile_shader(with_defines(example_source("flash_attention_mma.metal"), {"CAUSAL": int(causal)}))
    assert _attention(lib, metal, b, h, n, 64, causal) < 2e-3  # fp16 output rounding is ~5e-4 here


def test_removing_the_tile_reuse_barrier_is_caught(emulator, example_source):
    """The barrier before the next K/V tile overwrites the shared tiles: lockstep schedules
    happen to pass without it, a skewed schedule does not."""
    source = example_source("flash_attention_mma.metal")
    marker = "threadgroup_barrier(mem_flags::mem_threadgroup);  // the next tile overwrites"
    assert marker in source
    lib = emulator.compile_shader(source.replace(marker, "// barrier removed"))
    with pytest.raises(AssertionError, match="differs between schedules 'forward' and 'sg-random'"):
        _attention(lib, emulator, 1, 1, 128, 64)
