"""The opt-in flash_attn drop-in: an unchanged FlashAttention script runs on it; a real install wins;
arguments it cannot honour raise NotImplementedError naming them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mfa_hf
from mfa_hf import trace
from mfa_hf.integrations import flash_attn_shim
from mfa_hf.kernels.reference import attention_reference

# Written for FlashAttention-2, untouched: it checks itself against plain PyTorch math and prints OK.
FA_SCRIPT = textwrap.dedent('''
    import math
    import torch
    from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
    from flash_attn.flash_attn_interface import flash_attn_qkvpacked_func

    def naive(q, k, v, causal):
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        if causal:  # bottom-right, as FlashAttention aligns it
            lq, lk = q.shape[1], k.shape[1]
            s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(lk - lq + 1), float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 2, 16), torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    assert torch.allclose(flash_attn_func(q, k, v, causal=True), naive(q, k, v, True), atol=1e-5)
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    packed = flash_attn_varlen_func(q.flatten(0, 1), q.flatten(0, 1), v[:, :5].flatten(0, 1), cu, cu, 5, 5)
    assert torch.allclose(packed.view(2, 5, 2, 16), naive(q, q, v[:, :5], False), atol=1e-5)
    k_cache, v_cache = torch.zeros(2, 16, 2, 16), torch.zeros(2, 16, 2, 16)
    k_cache[:, :8], v_cache[:, :8] = k[:, :8], v[:, :8]
    out = flash_attn_with_kvcache(q[:, :1], k_cache, v_cache, k[:, 8:], v[:, 8:],
                                  cache_seqlens=torch.tensor([8, 8], dtype=torch.int32), causal=True)
    assert torch.equal(k_cache[:, 8], k[:, 8])  # appended in place, as FA2 does
    assert torch.allclose(out, naive(q[:, :1], k, v, True), atol=1e-5)
    qkv = torch.stack([q, q, q], dim=2)
    assert torch.allclose(flash_attn_qkvpacked_func(qkv), naive(q, q, q, False), atol=1e-5)
    import flash_attn
    print("OK", flash_attn.__version__)
''')


def _run(args, tmp_path, **env):
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, **env}, timeout=300)
    return result


def test_unchanged_flash_attn_script_runs_under_the_runner(tmp_path):
    script = tmp_path / "uses_flash_attn.py"
    script.write_text(FA_SCRIPT)
    result = _run(["-m", "mfa_hf.integrations.flash_attn_shim", str(script)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["OK", flash_attn_shim.VERSION]


def test_a_real_flash_attn_wins(tmp_path):
    real = tmp_path / "real" / "flash_attn"
    real.mkdir(parents=True)
    (real / "__init__.py").write_text("REAL = True\n")
    script = tmp_path / "which.py"
    script.write_text("import flash_attn\nprint(getattr(flash_attn, 'REAL', False))\n")
    result = _run(["-m", "mfa_hf.integrations.flash_attn_shim", str(script)], tmp_path,
                  PYTHONPATH=str(tmp_path / "real"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
    assert "a real flash_attn is installed" in result.stderr


@pytest.fixture
def flash_attn():
    assert "flash_attn" not in sys.modules, "a real or leftover flash_attn is imported"
    assert mfa_hf.install_flash_attn_shim()
    import flash_attn as module

    yield module
    mfa_hf.uninstall_flash_attn_shim()
    assert "flash_attn" not in sys.modules


def test_not_importable_unless_enabled():
    assert "flash_attn" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        import flash_attn  # noqa: F401


@pytest.mark.parametrize("call,names", [
    ("flash_attn_func", "return_attn_probs"),
    ("flash_attn_varlen_func", "return_attn_probs, block_table"),
    ("flash_attn_with_kvcache", "rotary_cos, rotary_sin, cache_leftpad, block_table"),
])
def test_unsupported_arguments_raise_naming_them(flash_attn, call, names):
    q = torch.randn(1, 4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    calls = {
        "flash_attn_func": lambda: flash_attn.flash_attn_func(q, q, q, return_attn_probs=True),
        "flash_attn_varlen_func": lambda: flash_attn.flash_attn_varlen_func(
            q[0], q[0], q[0], cu, cu, 4, 4, return_attn_probs=True, block_table=torch.zeros(1, 1, dtype=torch.int32)),
        "flash_attn_with_kvcache": lambda: flash_attn.flash_attn_with_kvcache(
            q, q, q, rotary_cos=q, rotary_sin=q, cache_leftpad=cu, block_table=cu),
    }
    with pytest.raises(NotImplementedError, match=f"{call}: mfa-hf's flash_attn shim does not support {names} "):
        calls[call]()


@pytest.mark.parametrize("causal,window,softcap", [(False, (-1, -1), 0.0), (True, (-1, -1), 0.0),
                                                   (False, (3, 1), 0.0), (True, (-1, -1), 5.0)])
def test_flash_attn_func_matches_the_reference_and_runs_our_kernel(flash_attn, causal, window, softcap):
    q, k, v = torch.randn(2, 7, 4, 16), torch.randn(2, 11, 2, 16), torch.randn(2, 11, 2, 16)
    with trace.capture() as served:
        out = flash_attn.flash_attn_func(q, k, v, softmax_scale=0.3, causal=causal, window_size=window,
                                         softcap=softcap, deterministic=True)
    expected = attention_reference(q.double(), k.double(), v.double(), softmax_scale=0.3, causal=causal,
                                   window_size=window, softcap=softcap)[0]
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert served


def test_kvpacked_and_varlen_packed_forms(flash_attn):
    q, kv = torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 2, 8)
    torch.testing.assert_close(flash_attn.flash_attn_kvpacked_func(q, kv, causal=True),
                               mfa_hf.flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], causal=True))
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    qkv = torch.randn(6, 3, 2, 8)
    torch.testing.assert_close(flash_attn.flash_attn_varlen_qkvpacked_func(qkv, cu, 4, causal=True),
                               mfa_hf.flash_attn_varlen_func(*qkv.unbind(1), cu, cu, 4, 4, causal=True))
    torch.testing.assert_close(flash_attn.flash_attn_varlen_kvpacked_func(qkv[:, 0], qkv[:, 1:], cu, cu, 4, 4),
                               mfa_hf.flash_attn_varlen_func(*qkv.unbind(1), cu, cu, 4, 4))
