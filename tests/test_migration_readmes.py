"""The README examples of mps-flash-attn and mtlflashattn, with the import changed to mfa-hf, on CPU.

Sizes are shrunk (their examples use 4K-100K tokens on an Apple GPU) and device="mps" is "cpu"; every
other line is the README's. Each result is checked, not only run. docs/migrating.md lists the meanings
that differ (window_size counts one key fewer here; bool masks are True = attend).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

import mfa_hf
from mfa_hf import trace
from mfa_hf.kernels.reference import attention_reference

N = 192  # their 4096


def _bhsd(seed, n=N, dtype=torch.float16, batch=2, heads=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, 64, generator=g).to(dtype) for _ in range(3)]


def _reference(q, k, v, **options):
    out, _ = attention_reference(*(t.double().transpose(1, 2) for t in (q, k, v)), **options)
    return out.transpose(1, 2)


def _close(out, ref, atol):
    assert out.shape == ref.shape
    assert float((out.double() - ref).abs().max()) < atol


# ---- mps-flash-attn README ----------------------------------------------------------------------

def test_mps_basic_causal_and_sliding_window():
    from mfa_hf import flash_attention  # was: from mps_flash_attn import flash_attention

    # (B, H, N, D) format
    q, k, v = _bhsd(0)

    out = flash_attention(q, k, v)
    _close(out, _reference(q, k, v), 2e-3)

    out = flash_attention(q, k, v, is_causal=True)
    _close(out, _reference(q, k, v, causal=True), 2e-3)

    # Only attend to last 64 tokens (their 4096; here the query's own key counts among the 64)
    out = flash_attention(q, k, v, is_causal=True, window_size=64)
    _close(out, _reference(q, k, v, causal=True, window_size=(63, 0)), 2e-3)


def test_mps_quantized_kv_cache():
    from mfa_hf import flash_attention, flash_attention_fp8, quantize_kv_fp8

    q, k, v = _bhsd(1)
    # Quantize K/V to FP8
    k_quant, k_scale = quantize_kv_fp8(k)
    v_quant, v_scale = quantize_kv_fp8(v)

    # Run attention with quantized KV
    out = flash_attention_fp8(q, k_quant, v_quant, k_scale, v_scale)
    exact = flash_attention(q, k, v)
    assert k_quant.dtype == torch.uint8 and out.shape == exact.shape
    assert float((out.float() - exact.float()).abs().max()) < 0.1 * float(exact.float().abs().max())


def test_mps_long_sequences_chunked():
    from mfa_hf import flash_attention, flash_attention_chunked

    q, k, v = _bhsd(2, n=600, dtype=torch.float32, batch=1)  # their 100000 tokens, chunks of 8192
    out = flash_attention_chunked(q, k, v, chunk_size=128)
    torch.testing.assert_close(out, flash_attention(q, k, v), rtol=0, atol=1e-5)


def test_mps_drop_in_sdpa_replacement():
    from mfa_hf import replace_sdpa

    q, k, v = _bhsd(3, dtype=torch.float32)
    stock = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    replace_sdpa()  # Patches F.scaled_dot_product_attention (mps and cuda calls; this one stays stock)
    try:
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, is_causal=True), stock)
    finally:
        mfa_hf.restore_sdpa()
    assert F.scaled_dot_product_attention is not None


def test_mps_torch_compile_support(monkeypatch):
    from mfa_hf import register_custom_op

    monkeypatch.setenv("MFA_BACKEND", "torch")  # our op in the graph: what the trace counts under compile (trace.py)

    register_custom_op()

    @torch.compile
    def my_attention(q, k, v):
        return torch.ops.mfa.flash_attention(q, k, v, False, None, None)

    q, k, v = _bhsd(4, dtype=torch.float32, batch=1, heads=2)
    with trace.capture() as calls:
        out = my_attention(q, k, v)
    assert sum(n for (_, op), n in trace.served_by(calls).items() if op == "fwd") >= 1
    _close(out, _reference(q, k, v), 1e-5)


def test_mps_training_with_bf16_backward(monkeypatch):
    from mfa_hf import flash_attention

    q, k, v = (t.requires_grad_() for t in _bhsd(5, dtype=torch.float32, batch=1, heads=2))
    with trace.capture() as calls:
        out = flash_attention(q, k, v, bf16_backward=True)
        loss = out.sum()
        loss.backward()
    assert sum(n for (_, op), n in trace.served_by(calls).items() if op == "bwd") == 1
    assert all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in (q, k, v))


def test_mps_benchmarking(monkeypatch, capsys):
    from mfa_hf.benchmark import __main__ as cli
    from mfa_hf.benchmark import suite_quick

    # python -m mfa_hf.benchmark --suite quick   (its shapes shrunk)
    monkeypatch.setitem(suite_quick.SHAPES, "cpu", [(1, 2, 48, 16, True)])
    assert cli.main(["--suite", "quick", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("# suite quick on cpu")

    from mfa_hf.benchmark import compare_vs_sdpa, run_suite

    results = run_suite(seq_lengths=[32, 64], repeats=1, verbose=False, as_frame=False)  # their 1024-4096
    assert [r["seqlen"] for r in results] == [32, 32, 64, 64]
    summary = compare_vs_sdpa(seq_lengths=[32, 64], repeats=1)
    assert summary["num_tests"] == 2 and "speedup" in capsys.readouterr().out


# ---- mtlflashattn README ------------------------------------------------------------------------

@pytest.fixture
def flash_attn_shim():
    assert "flash_attn" not in sys.modules, "a real or leftover flash_attn is imported"
    assert mfa_hf.install_flash_attn_shim()  # mtlflashattn's .pth did this at start-up; ours is opt-in
    yield
    mfa_hf.uninstall_flash_attn_shim()
    assert "flash_attn" not in sys.modules


def _bshd(seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, N, 4, 64, generator=g).to(torch.bfloat16)  # [B, S, H, D]; theirs (1, 8192, 16, 64)
    return q, torch.randn_like(q), torch.randn_like(q)


def test_mtl_flash_attn_drop_in(flash_attn_shim):
    from flash_attn import flash_attn_func  # served by mfa-hf

    q, k, v = _bshd(6)
    out = flash_attn_func(q, k, v, causal=True)
    ref, _ = attention_reference(q.double(), k.double(), v.double(), causal=True)
    _close(out, ref, 2e-2)


def test_mtl_direct_api():
    import mfa_hf as mfa  # was: import metal_flash_attn as mfa

    q, k, v = _bshd(7)
    out = mfa.flash_attn_func(q, k, v, causal=True, softmax_scale=0.125)
    ref, _ = attention_reference(q.double(), k.double(), v.double(), causal=True, softmax_scale=0.125)
    _close(out, ref, 2e-2)


def test_mtl_sdpa_patch():
    q, k, v = _bhsd(8, dtype=torch.float32, batch=1, heads=4)
    mfa_hf.replace_sdpa(devices=("cpu",), min_scores=0)  # was: metal_flash_attn.sdpa.install()
    try:
        with trace.capture() as calls:
            out = F.scaled_dot_product_attention(q, k, v)
    finally:
        mfa_hf.restore_sdpa()  # was: sdpa.uninstall()
    assert sum(trace.served_by(calls).values()) == 1  # ours (or the exact native path) served it
    _close(out, _reference(q, k, v), 1e-5)


# ---- mps-flash-attn's own docstring and tests (tests/test_mfa_v2.py), import changed -------------

def test_mps_docstring_mask_and_bias_examples():
    from mfa_hf import mps_flash_attn  # was: import mps_flash_attn

    q, k, v = _bhsd(6, n=64, dtype=torch.float32)
    # With attention mask: True masks out (mps-flash-attn's convention, kept by mfa_hf.mps_flash_attn)
    mask = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    mask[:, :, :, 32:] = True  # mask out second half of keys
    out = mps_flash_attn.flash_attention(q, k, v, attn_mask=mask)
    _close(out, _reference(q[:, :, :, :], k[:, :, :32], v[:, :, :32]), 1e-5)
    # Relative position bias (Swin Transformer style), pre-scaled by sqrt(head_dim)
    bias = torch.randn(1, 8, 64, 64)
    out = mps_flash_attn.flash_attention_with_bias(q, k, v, bias * math.sqrt(64))
    _close(out, _reference(q, k, v, attn_mask=bias.double()), 1e-5)


def test_mps_v2_bias_not_ignored_and_repeat_count():
    import mfa_hf as mfa  # was: import mps_flash_attn as mfa

    B, H, N, D = 1, 4, 64, 32
    torch.manual_seed(42)
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float16) for _ in range(3))
    zero_bias = torch.zeros(B, H, N, N, dtype=torch.float16)
    output_zero_bias = mfa.flash_attention_with_bias(q, k, v, zero_bias)
    output_no_bias = mfa.flash_attention(q, k, v)
    large_bias = torch.randn(B, H, N, N, dtype=torch.float16) * 10.0
    output_large_bias = mfa.flash_attention_with_bias(q, k, v, large_bias)
    assert (output_zero_bias - output_no_bias).abs().max().item() < 0.01
    assert (output_large_bias - output_no_bias).abs().max().item() > 0.1

    num_windows, H, ws, D = 8, 4, 32, 32
    q, k, v = (torch.randn(num_windows, H, ws, D, dtype=torch.float16) for _ in range(3))
    bias_single = torch.randn(1, H, ws, ws, dtype=torch.float16) * 0.1
    out1 = mfa.flash_attention_with_bias(q, k, v, bias_single, bias_repeat_count=num_windows)
    bias_expanded = bias_single.expand(num_windows, H, ws, ws).contiguous()
    out2 = mfa.flash_attention_with_bias(q, k, v, bias_expanded, bias_repeat_count=0)
    assert (out1 - out2).abs().max().item() < 0.01


def test_mps_v2_relative_position_bias_backward():
    import mfa_hf as mfa

    B, H, ws, D = 1, 4, 49, 32  # 7x7 window
    q, k, v = (torch.randn(B, H, ws, D, requires_grad=True) for _ in range(3))
    rel_pos_bias = (torch.randn(H, ws, ws) * 0.02).unsqueeze(0)
    output = mfa.flash_attention_with_bias(q, k, v, rel_pos_bias * math.sqrt(D))
    output.sum().backward()
    assert not any(torch.isnan(t).any() for t in (output, q.grad, k.grad, v.grad))
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _reference(*ref_leaves, attn_mask=rel_pos_bias.double())
    ref.sum().backward()
    for ours, theirs in zip((q, k, v), ref_leaves):
        assert float((ours.grad.double() - theirs.grad).abs().max()) < 1e-4


def test_mps_v2_is_available_and_benchmark_names(tmp_path):
    import mfa_hf as mps_flash_attn
    from mfa_hf import benchmark  # was: from mps_flash_attn import benchmark

    assert mps_flash_attn.is_available() == torch.backends.mps.is_available()  # gates their MPS-only tests
    assert hasattr(benchmark, "run_suite") and hasattr(benchmark, "compare_vs_sdpa")
    assert hasattr(benchmark, "generate_report")
    results = benchmark.run_suite(seq_lengths=[32], dtypes=["float32"], batch_sizes=[1], head_dims=[16],
                                  include_causal=False, include_window=False, verbose=False, device="cpu",
                                  as_frame=False)
    assert len(results) > 0 and results[0]["mfa_ms"] is not None  # theirs: results[0].mfa_time_ms
    benchmark.generate_report(results, tmp_path / "report.html")
    assert "Total benchmarks: 1" in (tmp_path / "report.html").read_text()
