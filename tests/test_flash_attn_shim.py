"""The opt-in flash_attn drop-in: an unchanged FlashAttention script runs on it; a real install wins;
FA2's return conventions (return_attn_probs, softmax_lse, S_dmask), its helper modules
(bert_padding, layers.rotary) and its kvcache options (rotary, cache_leftpad, paged KV) hold;
arguments it cannot honour raise naming them."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import mfa_hf
from mfa_hf import trace
from mfa_hf.integrations import flash_attn_shim
from mfa_hf.kernels.dropout import keep_mask
from mfa_hf.kernels.reference import attention_reference, attention_reference_varlen, visible_keys

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


def test_flash_attn_modules_and_helpers_are_served(flash_attn):
    import flash_attn.layers  # noqa: F401  (a package, as in FA2)
    from flash_attn.bert_padding import index_first_axis, index_put_first_axis, pad_input, unpad_input
    from flash_attn.flash_attn_interface import _get_block_size_n, flash_attn_func
    from flash_attn.layers.rotary import apply_rotary_emb

    assert flash_attn_func is flash_attn.flash_attn_func
    assert callable(apply_rotary_emb) and callable(index_first_axis) and callable(index_put_first_axis)
    assert callable(pad_input) and callable(unpad_input)
    assert _get_block_size_n("cuda", 64, True, False) == 128  # the shim's S_dmask block width, any device
    assert all(sys.modules[name].__version__ == flash_attn_shim.VERSION
               for name in sys.modules if name.split(".")[0] == "flash_attn")


def test_uninstall_forgets_every_served_module():
    assert mfa_hf.install_flash_attn_shim()
    import flash_attn.bert_padding  # noqa: F401
    import flash_attn.layers.rotary  # noqa: F401

    mfa_hf.uninstall_flash_attn_shim()
    assert not [name for name in sys.modules if name.split(".")[0] == "flash_attn"]


def test_mfa_hf_functions_return_out_and_lse():
    q, k, v = torch.randn(2, 5, 4, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    out, lse = mfa_hf.flash_attn_func(q, k, v, return_lse=True)
    assert out.shape == (2, 5, 4, 8) and lse.shape == (2, 4, 5) and lse.dtype == torch.float32
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    out, lse = mfa_hf.flash_attn_varlen_func(q[0], k[0, :5], v[0, :5], cu, cu, 3, 3, return_lse=True)
    assert out.shape == (5, 4, 8) and lse.shape == (4, 5)


# ---------------------------------------------------------------------------------------------
# return_attn_probs: FA2's (out, softmax_lse, S_dmask)


def _scores(q, k, causal, window, scale=None):
    """(B, Hq, Sq, Sk) float64 scaled scores, -inf where masked (the reference's meaning)."""
    g = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(g, dim=2))
    s = s * (scale if scale is not None else q.shape[-1] ** -0.5)
    return s.masked_fill(~visible_keys(q.shape[1], k.shape[1], causal, window), -math.inf)


def _decode_s_dmask(s_dmask, scores, lse, block_n):
    """FA2's decoding (what its tests do): |S| * exp(m - lse), m the maximum over the key blocks
    from each key's block to the last; the sign marks the dropout decision."""
    lk = scores.shape[-1]
    block_max = torch.stack([b.amax(-1) for b in scores.split(block_n, dim=-1)], dim=-1)
    running = block_max.flip(-1).cummax(-1).values.flip(-1)
    m = running.repeat_interleave(block_n, dim=-1)[..., :lk]
    probs = s_dmask.double().abs() * torch.exp(torch.where(m == -math.inf, 0.0, m) - lse[..., None])
    return probs.nan_to_num(0.0), s_dmask >= 0


@pytest.mark.parametrize("form", ["func", "kvpacked", "qkvpacked"])
def test_return_attn_probs_without_dropout_gives_out_lse_and_no_matrix(flash_attn, form):
    q, k, v = torch.randn(2, 7, 4, 16), torch.randn(2, 7, 4, 16), torch.randn(2, 7, 4, 16)
    if form == "func":
        result = flash_attn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    elif form == "kvpacked":
        result = flash_attn.flash_attn_kvpacked_func(q, torch.stack([k, v], 2), causal=True, return_attn_probs=True)
    else:
        result = flash_attn.flash_attn_qkvpacked_func(torch.stack([q, k, v], 2), causal=True, return_attn_probs=True)
    assert isinstance(result, tuple) and len(result) == 3
    out, lse, s_dmask = result
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert lse.shape == (2, 4, 7) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert s_dmask is None  # FA2 returns no matrix when dropout_p == 0


def test_softmax_lse_of_a_row_that_sees_no_key_is_plus_inf_as_in_fa2(flash_attn):
    q, k = torch.randn(1, 6, 2, 8), torch.randn(1, 2, 2, 8)
    out, lse, _ = flash_attn.flash_attn_func(q, k, k, causal=True, return_attn_probs=True)
    assert torch.equal(lse[..., :4], torch.full((1, 2, 4), math.inf))  # rows 0-3 see no key (bottom-right)
    assert torch.isfinite(lse[..., 4:]).all() and torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))
    _, own_lse = mfa_hf.flash_attn_func(q, k, k, causal=True, return_lse=True)
    assert (own_lse[..., :4] == -math.inf).all()  # mfa-hf's own API keeps the mathematical -inf


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (40, 7))])
def test_return_attn_probs_with_dropout_encodes_the_kernels_own_mask(flash_attn, causal, window):
    torch.manual_seed(0)
    p = 0.3
    q, k, v = torch.randn(2, 9, 4, 16), torch.randn(2, 150, 2, 16), torch.randn(2, 150, 2, 16)
    out, lse, s_dmask = flash_attn.flash_attn_func(q, k, v, p, causal=causal, window_size=window,
                                                   return_attn_probs=True)
    assert s_dmask.shape == (2, 4, 128, 256) and s_dmask.dtype == q.dtype  # rounded up to 128, as FA2
    assert torch.equal(s_dmask[:, :, 9:], torch.zeros_like(s_dmask[:, :, 9:]))
    assert torch.equal(s_dmask[..., 150:], torch.zeros_like(s_dmask[..., 150:]))
    _, ref_lse, ref_probs = attention_reference(q.double(), k.double(), v.double(), causal=causal,
                                                window_size=window, return_probs=True)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    from flash_attn.flash_attn_interface import _get_block_size_n

    block_n = _get_block_size_n(q.device, 16, True, causal)
    probs, keep = _decode_s_dmask(s_dmask[:, :, :9, :150], _scores(q, k, causal, window), ref_lse, block_n)
    torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=1e-5)
    # The decoded mask is the one that produced `out`.
    dropped = (ref_probs * keep / (1 - p)).to(torch.float64)
    expected = torch.einsum("bhqk,bkhd->bqhd", dropped, v.double().repeat_interleave(2, dim=2))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    visible = ref_probs > 0
    assert abs((~keep & visible).sum().item() / visible.sum().item() - p) < 0.05


def test_varlen_return_attn_probs_shapes_and_mask(flash_attn):
    torch.manual_seed(1)
    p = 0.25
    cu_q, cu_k = torch.tensor([0, 5, 12], dtype=torch.int32), torch.tensor([0, 140, 150], dtype=torch.int32)
    q, k, v = torch.randn(12, 4, 8), torch.randn(150, 2, 8), torch.randn(150, 2, 8)
    out, lse, s_dmask = flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 140, p, causal=True,
                                                          return_attn_probs=True)
    assert out.shape == (12, 4, 8) and lse.shape == (4, 12) and lse.dtype == torch.float32
    assert s_dmask.shape == (2, 4, 128, 256)
    for b, (qs, qe, ks, ke) in enumerate([(0, 5, 0, 140), (5, 12, 140, 150)]):
        _, ref_lse, ref_probs = attention_reference(q[None, qs:qe].double(), k[None, ks:ke].double(),
                                                    v[None, ks:ke].double(), causal=True, return_probs=True)
        torch.testing.assert_close(lse[:, qs:qe].double(), ref_lse[0], atol=1e-5, rtol=1e-5)
        block = s_dmask[b : b + 1, :, : qe - qs, : ke - ks]
        assert not s_dmask[b, :, qe - qs :].any() and not s_dmask[b, :, :, ke - ks :].any()
        probs, keep = _decode_s_dmask(block, _scores(q[None, qs:qe], k[None, ks:ke], True, (-1, -1)), ref_lse, 128)
        torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=1e-5)
        expected = torch.einsum("bhqk,bkhd->bqhd", ref_probs * keep / (1 - p),
                                v[None, ks:ke].double().repeat_interleave(2, dim=2))
        torch.testing.assert_close(out[None, qs:qe].double(), expected, atol=1e-5, rtol=1e-5)
    packed = flash_attn.flash_attn_varlen_qkvpacked_func(torch.stack([q, q, q], 1), cu_q, 7, return_attn_probs=True)
    assert len(packed) == 3 and packed[1].shape == (4, 12) and packed[2] is None


# ---------------------------------------------------------------------------------------------
# window_size given as int-likes


@pytest.mark.parametrize("window", [
    (torch.tensor(3), torch.tensor(1)), (torch.tensor([3]), np.int64(1)), [3, 1], torch.tensor([3, 1]),
    np.array([3, 1]), (np.int32(3), 1)])
def test_window_size_accepts_int_likes(flash_attn, window):
    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8)
    expected = flash_attn.flash_attn_func(q, k, v, window_size=(3, 1))
    torch.testing.assert_close(flash_attn.flash_attn_func(q, k, v, window_size=window), expected)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 9], dtype=torch.int32)
    torch.testing.assert_close(flash_attn.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu_k, 6, 9, window_size=window),
                               expected[0])
    cache_out = flash_attn.flash_attn_with_kvcache(q, k.clone(), v.clone(), window_size=window)
    torch.testing.assert_close(cache_out, expected)


def test_a_negative_window_side_is_unbounded_as_in_fa2(flash_attn):
    q = torch.randn(1, 5, 2, 8)
    torch.testing.assert_close(flash_attn.flash_attn_func(q, q, q, window_size=(-7, 1)),
                               flash_attn.flash_attn_func(q, q, q, window_size=(-1, 1)))


@pytest.mark.parametrize("window", [(3.0, 1), ("3", 1), (True, 1), (3,), (1, 2, 3), None,
                                    torch.tensor([1.5, 2.0]), torch.tensor([True, False]), 4])
def test_bad_window_size_is_named(flash_attn, window):
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="window_size"):
        flash_attn.flash_attn_func(q, q, q, window_size=window)


# ---------------------------------------------------------------------------------------------
# flash_attn.bert_padding


@pytest.mark.parametrize("as_int", [False, True])
def test_bert_padding_round_trip(flash_attn, as_int):
    from flash_attn.bert_padding import index_first_axis, index_put_first_axis, pad_input, unpad_input

    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    mask = mask.to(torch.int32) if as_int else mask
    x = torch.randn(3, 6, 2, 4, requires_grad=True)
    result = unpad_input(x, mask)
    assert len(result) == 5  # FA2 2.8.3's arity (2.7 added seqused)
    x_unpad, indices, cu_seqlens, max_seqlen, seqused = result
    assert seqused.dtype == torch.int32 and seqused.tolist() == [3, 0, 4]
    assert x_unpad.shape == (7, 2, 4) and indices.dtype == torch.int64
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 3, 3, 7]
    assert max_seqlen == 4 and isinstance(max_seqlen, int)
    assert indices.tolist() == [0, 1, 2, 13, 14, 16, 17]
    padded = pad_input(x_unpad, indices, 3, 6)
    assert torch.equal(padded, x * mask.bool()[:, :, None, None])
    padded.sum().backward()
    assert torch.equal(x.grad, mask.bool()[:, :, None, None].float().expand_as(x))
    rows = torch.randn(10, 3)
    picked = index_first_axis(rows, torch.tensor([7, 2]))
    assert torch.equal(picked, rows[[7, 2]])
    assert torch.equal(index_put_first_axis(picked, torch.tensor([7, 2]), 10)[[7, 2]], picked)
    assert not index_put_first_axis(picked, torch.tensor([7, 2]), 10)[[0, 1, 3]].any()


def test_unpad_input_of_an_all_padding_batch(flash_attn):
    from flash_attn.bert_padding import pad_input, unpad_input

    x = torch.randn(2, 3, 4)
    x_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, torch.zeros(2, 3, dtype=torch.bool))
    assert x_unpad.shape == (0, 4) and cu_seqlens.tolist() == [0, 0, 0] and max_seqlen == 0
    assert seqused.tolist() == [0, 0]
    assert torch.equal(pad_input(x_unpad, indices, 2, 3), torch.zeros_like(x))


def test_unpad_input_keeps_unused_slots(flash_attn):
    """FA2 >= 2.7: unused_mask marks slots allocated but unused; they are kept and counted in cu_seqlens and
    max_seqlen, while seqused counts attention_mask's tokens only."""
    from flash_attn.bert_padding import unpad_input

    x = torch.arange(12.0).view(2, 6, 1)
    used = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    unused = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0]], dtype=torch.int32)
    x_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, used, unused)
    assert indices.tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 10] and torch.equal(x_unpad.flatten(), indices.float())
    assert cu_seqlens.tolist() == [0, 4, 9] and max_seqlen == 5 and seqused.tolist() == [2, 4]
    with pytest.raises(ValueError, match="unused_mask: expected shape"):
        unpad_input(x, used, unused[:, :3])


def test_fa2_tests_imports_resolve(flash_attn):
    """What FA2's own tests import from the package (2.8.3 and its main branch): USE_TRITON_ROCM is False."""
    from flash_attn.flash_attn_interface import USE_TRITON_ROCM, _get_block_size_n  # noqa: F401

    assert USE_TRITON_ROCM is False


def test_unpad_input_for_concatenated_sequences(flash_attn):
    from flash_attn.bert_padding import unpad_input_for_concatenated_sequences

    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    x = torch.arange(18.0).view(3, 6, 1)
    x_unpad, indices, cu_seqlens, max_seqlen = unpad_input_for_concatenated_sequences(x, lengths)
    assert cu_seqlens.tolist() == [0, 2, 5, 8, 10, 16] and max_seqlen == 6
    assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
    assert torch.equal(x_unpad.flatten(), indices.float())


@pytest.mark.parametrize("call,name", [
    ("unpad_input(torch.randn(2, 3, 4), torch.ones(3, 2, dtype=torch.bool))", "attention_mask"),
    ("unpad_input(torch.randn(2, 3, 4), torch.ones(2, 3))", "attention_mask"),
    ("unpad_input(torch.randn(6), torch.ones(2, 3, dtype=torch.bool))", "hidden_states"),
    ("pad_input(torch.randn(3, 4), torch.tensor([[0, 1, 2]]), 1, 3)", "indices"),
    ("index_put_first_axis(torch.randn(3, 4), torch.tensor([0, 1]), 5)", "indices"),
    ("unpad_input_for_concatenated_sequences(torch.randn(1, 3, 2), torch.tensor([[2, 2, 0]]))",
     "attention_mask_in_length"),
])
def test_bert_padding_bad_inputs_are_named(flash_attn, call, name):
    from flash_attn import bert_padding

    with pytest.raises(ValueError, match=name):
        eval(call, {"torch": torch, **{n: getattr(bert_padding, n) for n in bert_padding.__all__}})


# ---------------------------------------------------------------------------------------------
# flash_attn.layers.rotary and rotary in flash_attn_with_kvcache


def _naive_rotary(x, cos, sin, positions, interleaved):
    """Complex multiplication by e^(i angle) of channel pairs; positions (B, S)."""
    rd = 2 * cos.shape[1]
    angle = torch.atan2(sin.double(), cos.double())[positions][:, :, None, :]  # (B, S, 1, R/2)
    part = x[..., :rd].double()
    pairs = (part[..., 0::2], part[..., 1::2]) if interleaved else part.chunk(2, dim=-1)
    rotated = torch.complex(*pairs) * torch.exp(1j * angle)
    if interleaved:
        part = torch.stack([rotated.real, rotated.imag], dim=-1).flatten(-2)
    else:
        part = torch.cat([rotated.real, rotated.imag], dim=-1)
    return torch.cat([part, x[..., rd:].double()], dim=-1)


def _tables(length, rotary_dim, dtype=torch.float32):
    angle = torch.rand(length, rotary_dim // 2) * 2 * math.pi
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_emb_matches_complex_rotation(flash_attn, interleaved):
    from flash_attn.layers.rotary import apply_rotary_emb

    torch.manual_seed(0)
    cos, sin = _tables(20, 8)
    x = torch.randn(2, 5, 3, 12)
    offsets = torch.tensor([0, 7], dtype=torch.int32)
    out = apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
    positions = offsets[:, None].long() + torch.arange(5)[None, :]
    torch.testing.assert_close(out.double(), _naive_rotary(x, cos, sin, positions, interleaved), atol=1e-6, rtol=1e-6)
    assert torch.equal(out[..., 8:], x[..., 8:])  # channels past rotary_dim untouched
    shifted = apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=3)
    torch.testing.assert_close(shifted.double(), _naive_rotary(x, cos, sin, torch.arange(3, 8).expand(2, 5),
                                                               interleaved), atol=1e-6, rtol=1e-6)
    # Packed: sequence b of the packed tensor rotates as the dense row b (lengths 5 and 3).
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    packed = apply_rotary_emb(torch.cat([x[0], x[1, :3]]), cos, sin, interleaved=interleaved,
                              seqlen_offsets=offsets, cu_seqlens=cu, max_seqlen=5)
    torch.testing.assert_close(packed, torch.cat([out[0], out[1, :3]]))
    y = x.clone()
    assert apply_rotary_emb(y, cos, sin, interleaved=interleaved, inplace=True, seqlen_offsets=offsets) is y
    torch.testing.assert_close(y, out)


def test_apply_rotary_emb_gradient_is_the_inverse_rotation(flash_attn):
    from flash_attn.layers.rotary import apply_rotary_emb

    cos, sin = _tables(6, 4, torch.float64)
    x = torch.randn(1, 6, 2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rotary_emb(t, cos, sin), (x,))


@pytest.mark.parametrize("causal,interleaved", [(True, False), (False, True), (False, False)])
def test_kvcache_rotary_rotates_q_and_new_k_before_the_append(flash_attn, causal, interleaved):
    from flash_attn.layers.rotary import apply_rotary_emb

    torch.manual_seed(2)
    batch, lq, heads, heads_kv, dim, capacity, rotary_dim = 2, 3, 4, 2, 32, 40, 16
    q = torch.randn(batch, lq, heads, dim)
    k_new, v_new = torch.randn(batch, lq, heads_kv, dim), torch.randn(batch, lq, heads_kv, dim)
    k_cache, v_cache = torch.randn(batch, capacity, heads_kv, dim), torch.randn(batch, capacity, heads_kv, dim)
    lengths = torch.tensor([5, 17], dtype=torch.int32)
    cos, sin = _tables(capacity, rotary_dim)
    k_ro = apply_rotary_emb(k_new, cos, sin, seqlen_offsets=lengths, interleaved=interleaved)
    if causal:  # every query at its own position after the cache
        q_ro = apply_rotary_emb(q, cos, sin, seqlen_offsets=lengths, interleaved=interleaved)
    else:  # FA2: all queries at position cache_seqlens
        q_ro = apply_rotary_emb(q.reshape(batch, 1, lq * heads, dim), cos, sin, seqlen_offsets=lengths,
                                interleaved=interleaved).reshape(batch, lq, heads, dim)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    for b, n in enumerate(lengths.tolist()):
        k_ref[b, n : n + lq], v_ref[b, n : n + lq] = k_ro[b], v_new[b]
    out, lse = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                                  cache_seqlens=lengths, causal=causal, rotary_interleaved=interleaved,
                                                  return_softmax_lse=True)
    torch.testing.assert_close(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)
    for b, n in enumerate(lengths.tolist()):
        ref, ref_lse = attention_reference(q_ro[b : b + 1].double(), k_ref[b : b + 1, : n + lq].double(),
                                           v_ref[b : b + 1, : n + lq].double(), causal=causal)
        torch.testing.assert_close(out[b : b + 1].double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[b : b + 1].double(), ref_lse, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# cache_leftpad and paged KV (block_table)


def test_kvcache_leftpad_starts_each_sequence_at_its_pad(flash_attn):
    torch.manual_seed(3)
    q = torch.randn(2, 2, 4, 16)
    k_cache, v_cache = torch.randn(3, 30, 2, 16), torch.randn(3, 30, 2, 16)
    k_new, v_new = torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16)
    lengths, pads = torch.tensor([12, 20], dtype=torch.int32), torch.tensor([4, 0], dtype=torch.int32)
    rows, slopes = torch.tensor([2, 0], dtype=torch.int32), torch.rand(2, 4)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    out = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lengths,
                                             cache_batch_idx=rows, cache_leftpad=pads, causal=True,
                                             window_size=(9, -1), alibi_slopes=slopes)
    for b, (n, pad, row) in enumerate(zip(lengths.tolist(), pads.tolist(), rows.tolist())):
        k_ref[row, n : n + 2], v_ref[row, n : n + 2] = k_new[b], v_new[b]
        ref, _ = attention_reference(q[b : b + 1].double(), k_ref[row : row + 1, pad : n + 2].double(),
                                     v_ref[row : row + 1, pad : n + 2].double(), causal=True, window_size=(9, -1),
                                     alibi_slopes=slopes[b].double())
        torch.testing.assert_close(out[b : b + 1].double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_paged_kvcache_matches_the_gathered_cache_and_writes_the_pages(flash_attn):
    torch.manual_seed(4)
    page, pages_per_seq = 8, 3
    k_pages, v_pages = torch.randn(7, page, 2, 16), torch.randn(7, page, 2, 16)
    table = torch.randperm(7)[:6].view(2, pages_per_seq).to(torch.int32)
    q, k_new, v_new = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 16)
    lengths = torch.tensor([5, 13], dtype=torch.int32)
    k_lin = k_pages[table.long()].flatten(1, 2).clone()
    v_lin = v_pages[table.long()].flatten(1, 2).clone()
    expected = flash_attn.flash_attn_with_kvcache(q, k_lin, v_lin, k_new, v_new, cache_seqlens=lengths, causal=True)
    out = flash_attn.flash_attn_with_kvcache(q, k_pages, v_pages, k_new, v_new, cache_seqlens=lengths,
                                             block_table=table, causal=True)
    torch.testing.assert_close(out, expected)
    assert torch.equal(k_pages[table.long()].flatten(1, 2), k_lin)  # the appended rows landed in their pages
    assert torch.equal(v_pages[table.long()].flatten(1, 2), v_lin)


def test_varlen_with_block_table_reads_keys_from_pages(flash_attn):
    torch.manual_seed(5)
    k_pages, v_pages = torch.randn(6, 8, 2, 16), torch.randn(6, 8, 2, 16)
    table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    cu_q, cu_k = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 10, 30], dtype=torch.int32)
    q = torch.randn(7, 4, 16)
    k = torch.cat([k_pages[table[0].long()].flatten(0, 1)[:10], k_pages[table[1].long()].flatten(0, 1)[:20]])
    v = torch.cat([v_pages[table[0].long()].flatten(0, 1)[:10], v_pages[table[1].long()].flatten(0, 1)[:20]])
    out = flash_attn.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 4, 20, causal=True, block_table=table)
    ref, _ = attention_reference_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case,error,match", [
    ("paged_batch_idx", NotImplementedError, "block_table with cache_batch_idx"),
    ("paged_leftpad", NotImplementedError, "block_table with cache_leftpad"),
    ("cos_only", ValueError, "rotary_sin"),
    ("rotary_without_k", ValueError, "rotary_cos"),
    ("rotary_too_wide", ValueError, "rotary_cos"),
    ("leftpad_past_length", ValueError, "cache_leftpad"),
    ("leftpad_shape", ValueError, "cache_leftpad"),
    ("page_out_of_range", ValueError, "block_table"),
    ("table_rows_too_few", ValueError, r"block_table: expected 2 rows .* got shape \(1, 1\)"),  # named k_cache before
    ("table_rows_too_many", ValueError, r"block_table: expected 2 rows .* got shape \(3, 1\)"),
    ("varlen_pages_too_short", ValueError, "cu_seqlens_k"),
])
def test_kvcache_bad_inputs_are_named(flash_attn, case, error, match):
    q, k_cache = torch.randn(2, 1, 2, 8), torch.randn(2, 16, 2, 8)
    new = torch.randn(2, 1, 2, 8)
    lengths = torch.tensor([3, 4], dtype=torch.int32)
    cos, sin = _tables(16, 4)
    table = torch.tensor([[0], [1]], dtype=torch.int32)
    calls = {
        "paged_batch_idx": dict(block_table=table, cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32)),
        "paged_leftpad": dict(block_table=table, cache_leftpad=torch.tensor([0, 1], dtype=torch.int32)),
        "cos_only": dict(k=new, v=new, rotary_cos=cos),
        "rotary_without_k": dict(rotary_cos=cos, rotary_sin=sin),
        "rotary_too_wide": dict(k=new, v=new, rotary_cos=torch.ones(16, 5), rotary_sin=torch.ones(16, 5)),
        "leftpad_past_length": dict(cache_leftpad=torch.tensor([0, 5], dtype=torch.int32)),
        "leftpad_shape": dict(cache_leftpad=torch.tensor([0], dtype=torch.int32)),
        "page_out_of_range": dict(block_table=torch.tensor([[0], [2]], dtype=torch.int32)),
        "table_rows_too_few": dict(block_table=table[:1]),
        "table_rows_too_many": dict(block_table=torch.tensor([[0], [1], [0]], dtype=torch.int32)),
    }
    if case == "varlen_pages_too_short":
        cu = torch.tensor([0, 1, 2], dtype=torch.int32)
        with pytest.raises(error, match=match):
            flash_attn.flash_attn_varlen_func(q[:, 0], k_cache, k_cache, cu, torch.tensor([0, 3, 20], dtype=torch.int32),
                                              1, 17, block_table=table)
        return
    with pytest.raises(error, match=match):
        flash_attn.flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=lengths, **calls[case])


@pytest.mark.parametrize("append", [False, True])
def test_lengths_past_the_block_table_are_refused_as_fa2_does(flash_attn, append):
    """cache_seqlens (+ the appended keys) beyond what block_table's pages hold: FA2 raises RuntimeError naming
    block_table (its tests expect that type); ours is also a ValueError naming cache_seqlens, and nothing is written."""
    k_pages, v_pages = torch.randn(4, 16, 1, 8), torch.randn(4, 16, 1, 8)
    table = torch.zeros(1, 1, dtype=torch.int32)
    new = torch.randn(1, 1, 1, 8) if append else None
    lengths = torch.full((1,), 16 if append else 17, dtype=torch.int32)
    before = k_pages.clone()
    for error in (RuntimeError, ValueError):
        with pytest.raises(error, match=r"cache_seqlens: .*block_table's 1 blocks per sequence of 16 tokens"):
            flash_attn.flash_attn_with_kvcache(torch.randn(1, 1, 1, 8), k_pages, v_pages, k=new, v=new,
                                               cache_seqlens=lengths, block_table=table, causal=False)
    assert torch.equal(k_pages, before)


def test_kvcache_bad_index_and_cache_arguments_name_themselves():
    """Found by a fuzzing pass: these reached torch (AttributeError, .item() on meta), were cast before any check
    (float, bool, int64 > 2**31 lengths) or silently read another cache row (a negative cache_batch_idx)."""
    from mfa_hf.integrations.flash_attn_shim import interface as shim

    q = torch.randn(2, 1, 2, 8)
    k_cache, v_cache = torch.randn(2, 8, 1, 8), torch.randn(2, 8, 1, 8)
    lengths, pad = torch.tensor([5, 6], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32)
    for bad in (torch.tensor([1.5, 2.7]), torch.tensor([True, False])):
        with pytest.raises(TypeError, match=r"cache_seqlens: expected .*int32.*got a torch\.(float32|bool)"):
            shim.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=bad)
    with pytest.raises(ValueError, match=r"cache_seqlens: .*capacity 8.*4294967299"):
        shim.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([2**32 + 3, 4]))
    for rows in ([1, -2], [0, 7]):
        with pytest.raises(ValueError, match=r"cache_batch_idx: expected rows in \[0, 2\)"):
            shim.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, cache_leftpad=pad,
                                         cache_batch_idx=torch.tensor(rows, dtype=torch.int32))
    new = torch.randn(2, 1, 1, 8)
    with pytest.raises(ValueError, match=r"cache_batch_idx: expected distinct rows when appending"):
        shim.flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=lengths, cache_leftpad=pad,
                                     cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32))
    for cache in (None, [[0.0]]):
        with pytest.raises(TypeError, match=r"k_cache: expected a tensor"):
            shim.flash_attn_with_kvcache(q, cache, v_cache)
    with pytest.raises(ValueError, match=r"block_table: expected device cpu like k_cache, got meta"):
        shim.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                     block_table=torch.tensor([[0], [1]], device="meta"))


def test_rotary_offsets_and_tables_are_checked():
    """apply_rotary_emb's cu_seqlens get the varlen rules (int dtype, 0, non-decreasing, x's total) and the cos/sin
    tables x's device, instead of a silent rotation at wrong positions or torch's meta-copy error."""
    from mfa_hf.integrations.flash_attn_shim.rotary import apply_rotary_emb

    x, cos, sin = torch.randn(5, 2, 8), torch.randn(16, 2), torch.randn(16, 2)
    bad = {"expected dtype int32 or int64": torch.tensor([0.0, 2.5, 5.0]),
           "expected non-decreasing offsets": torch.tensor([0, 4, 2]),
           "expected to end at the total length 5": torch.tensor([0, 2, 9]),
           "expected to start at 0": torch.tensor([3, 4, 5])}
    for message, cu in bad.items():
        with pytest.raises((TypeError, ValueError), match=f"cu_seqlens: {message}"):
            apply_rotary_emb(x, cos, sin, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"cos: expected device cpu like the rotated tensor, got meta"):
        apply_rotary_emb(torch.randn(2, 3, 4, 8), cos.to("meta"), sin.to("meta"))
    ok = apply_rotary_emb(x, cos, sin, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))
    parts = [apply_rotary_emb(x[None, a:b], cos, sin)[0] for a, b in ((0, 2), (2, 5))]
    torch.testing.assert_close(ok, torch.cat(parts))
