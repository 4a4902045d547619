"""The triton backward on a CUDA GPU: every block configuration the tables can pick matches the
float64 reference and repeats bitwise over 20 runs (benchmarks/triton/backward_repeatability.py).
The GPU cases skip without CUDA: the interpreter runs programs one at a time and cannot race."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from mfa_hf.kernels.triton import blocks


def _load_script(name: str):
    """A benchmarks/triton script, by file path: benchmarks/ is not a package and is not installed."""
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "triton" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_repeatability = _load_script("backward_repeatability")
check, table_configurations = _repeatability.check, _repeatability.table_configurations

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (races do not exist under the interpreter)")


@needs_cuda
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("dim, dtype, causal, seqlen", table_configurations(), ids=str)
def test_backward_matches_reference_and_repeats(dim, dtype, causal, seqlen, deterministic, monkeypatch):
    monkeypatch.setenv("MFA_BACKEND", "triton")
    check(dim, dtype, causal, seqlen=seqlen, deterministic=deterministic)


def test_every_table_configuration_is_reached():
    """table_configurations() picks every entry of both backward tables, for each dtype, and the long-sequence
    entry of every head dim that has a short-sequence one (check() runs Lk = seqlen + 6)."""
    picked = {(blocks.padded_dim(d), t) for d, t, _, _ in table_configurations()}
    assert {(d, t) for d in blocks._BACKWARD_KV for t in (torch.float16, torch.bfloat16, torch.float32)} <= picked
    chosen = {blocks.backward_kv_blocks(d, t, c, "cuda", n + 6) for d, t, c, n in table_configurations()}
    assert set(blocks._BACKWARD_KV_SMALL.values()) <= chosen
    assert {blocks._BACKWARD_KV[d] for d in blocks._BACKWARD_KV_SMALL} <= chosen
    chosen_q = {blocks.backward_q_blocks(d, t, c, "cuda", n + 6) for d, t, c, n in table_configurations()}
    assert set(blocks._BACKWARD_Q_LONG.values()) <= chosen_q
    assert {blocks._BACKWARD_Q[d] for d in blocks._BACKWARD_Q_LONG} <= chosen_q


def test_long_dq_entry_serves_half_precision_long_unwindowed_only():
    """The dQ pass's third stage (blocks._BACKWARD_Q_LONG) was timed on bf16 sequences past LONG_BACKWARD_Q_N keys
    without a window; a window, a shorter sequence, float32 and an unknown length keep the table's entry."""
    long, n = blocks._BACKWARD_Q_LONG[128], blocks.LONG_BACKWARD_Q_N
    for dtype in (torch.float16, torch.bfloat16):
        assert blocks.backward_q_blocks(128, dtype, True, "cuda", n + 1) == long
        assert blocks.backward_q_blocks(96, dtype, False, "cuda", 4 * n) == long  # padded to 128
        assert blocks.backward_q_blocks(128, dtype, True, "cuda", n) == blocks._BACKWARD_Q[128]
        assert blocks.backward_q_blocks(128, dtype, True, "cuda", 8 * n, windowed=True) == blocks._BACKWARD_Q[128]
        assert blocks.backward_q_blocks(128, dtype, True, "cuda") == blocks._BACKWARD_Q[128]
        assert blocks.backward_q_blocks(64, dtype, True, "cuda", 8 * n) == blocks._BACKWARD_Q[64]
    assert blocks.backward_q_blocks(128, torch.float32, True, "cuda", 8 * n) == \
        blocks.backward_q_blocks(128, torch.float32, True, "cuda")
    assert blocks.backward_q_blocks(128, torch.bfloat16, True, "cpu", 8 * n) == blocks._TINY


@pytest.mark.parametrize("shape", [(32, 128, 4, 2), (16, 64, 4, 3)])
def test_racy_dkdv_shapes_are_refused(shape):
    with pytest.raises(ValueError, match=r"_BACKWARD_KV\[64\]: expected block_m >= 64 or one stage"):
        blocks._check_backward_kv({64: blocks.Blocks(*shape)})
    blocks._check_backward_kv({64: blocks.Blocks(shape[0], shape[1], shape[2], 1)})  # one stage: nothing prefetched


def test_offsets_past_int32_are_refused_clearly():
    """The triton kernels index within a batch row in 32 bits: calls that reach 2**31 elements go
    elsewhere, with the reason, instead of silently reading wrapped offsets."""
    import dataclasses

    from mfa_hf.kernels.triton import backend
    from mfa_hf.kernels.contract import AttentionCall, Options
    from mfa_hf.ops import describe

    q, k = torch.empty(3, 4, 2, 8), torch.empty(3, 6, 2, 8)
    problem = dataclasses.replace(describe(AttentionCall(q, k, k, Options(0.25))), device_type="cuda")
    assert problem.largest_span == 6 * 2 * 8  # one batch row of k (batches are offset in 64 bits)
    assert backend.supports(dataclasses.replace(problem, largest_span=2**31))[0]
    ok, reason = backend.supports(dataclasses.replace(problem, largest_span=2**31 + 1))
    assert not ok and "32-bit offsets" in reason and "2147483648" in reason
    wide = torch.empty(1, 1, 1, 1).expand(2, 2**20, 2**11, 1)  # stride 0: reaches one element only
    assert describe(AttentionCall(wide, wide, wide, Options(1.0))).largest_span == 2**31
