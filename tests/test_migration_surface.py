"""mps-flash-attn's remaining names (mfa_hf.mps_flash_attn) against a float64 reference written with ITS
meanings: mask True = masked out, window w = keys i - w .. i, causal/window aligned top-left, bias added
before the scale. Fresh random inputs on CPU; tolerances by mfa_hf.testing's rule (PyTorch's own error in
the input dtype sets the bar)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import mfa_hf
from mfa_hf import mps_flash_attn as mfa
from mfa_hf.mps_quantized import FORMATS
from mfa_hf.quant import dequantize_codes
from mfa_hf.testing import GRADIENT_FACTOR, assert_close_to_reference


def _inputs(lq, lk, dtype, b=2, h=3, d=32, grad=False):
    return [torch.randn(b, h, n, d).to(dtype).requires_grad_(grad) for n in (lq, lk, lk)]


def mps_reference(q, k, v, is_causal=False, masked_out=None, window=0, bias=None, scale=None, dtype=torch.float64):
    """softmax((Q K^T + bias) * scale) V with mps-flash-attn's top-left causal/window; in `dtype`
    (float64: the reference; the input dtype: PyTorch's own error, the tolerance's baseline)."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-1, -2)
    if bias is not None:
        scores = scores + bias.to(dtype)
    scores = (scores * scale).to(torch.float64 if dtype == torch.float64 else torch.float32)
    i = torch.arange(q.shape[2])[:, None]
    j = torch.arange(k.shape[2])[None, :]
    hidden = (j > i) if is_causal else torch.zeros_like(j > i)
    if window:
        hidden = hidden | (j < i - window)
    if masked_out is not None:
        hidden = hidden | masked_out.bool()
    probs = torch.softmax(scores.masked_fill(hidden, -math.inf), dim=-1)
    return probs.nan_to_num(0.0).to(dtype) @ v  # a row that sees no key: 0, mfa_hf's convention


def _check(out, q, k, v, **semantics):
    ref = mps_reference(q.detach(), k.detach(), v.detach(), **semantics)
    baseline = mps_reference(q.detach(), k.detach(), v.detach(), dtype=q.dtype, **semantics)
    assert_close_to_reference(out, ref, baseline)


LENGTHS = [(24, 24), (9, 24), (24, 9)]  # square, Lq < Lk, Lq > Lk (top-left there)


def test_top_left_translation_sees_exactly_the_top_left_keys():
    """Every Lq, Lk < 9, causal or not, every window: the flags over the kept keys, read with mfa_hf's bottom-right
    meaning (FlashAttention-2's: key j is visible to row i from i + Lk - Lq - left to i + Lk - Lq + right, -1 no
    bound), see the keys top-left sees; None (a mask) only where some row sees no key."""
    from mfa_hf.sdpa_semantics import translate

    for lq, lk, causal, w in itertools.product(range(9), range(9), (False, True), range(10)):
        top_left = {(i, j) for i in range(lq) for j in range(lk) if (not causal or j <= i) and (not w or j >= i - w)}
        flags = translate(lq, lk, causal, w or None)
        if flags is None:
            assert w and any(all((i, j) not in top_left for j in range(lk)) for i in range(lq)), (lq, lk, causal, w)
            continue
        kept, is_causal, (left, right) = lk if flags.keys is None else flags.keys, flags.causal, flags.window
        diagonal = kept - lq
        seen = {(i, j) for i in range(lq) for j in range(kept)
                if (left < 0 or j >= i + diagonal - left) and (right < 0 or j <= i + diagonal + right)
                and (not is_causal or j <= i + diagonal)}
        assert seen == top_left, (lq, lk, causal, w, flags)


def test_no_mask_is_built_where_the_flags_say_it():
    """A dense (Lq, Lk) mask does not fit 100K+ inputs: visibility returns none without the caller's own."""
    from mfa_hf.mps_visibility import visibility

    for lq, lk, causal, w in [(3, 100_000, True, 0), (100_000, 3, True, 0), (3, 100_000, False, 7),
                              (100_000, 99_990, True, 10), (50, 100_000, True, 16)]:
        q, k = torch.empty(1, 1, lq, 8), torch.empty(1, 1, lk, 8)
        key, value, _, _, mask = visibility(q, k, k, causal, w, None)
        assert mask is None and key.shape[2] == value.shape[2] == (lq if causal and lq < lk else lk)


@pytest.mark.parametrize("lq,lk", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("is_causal,window", [(False, 0), (True, 0), (True, 5), (False, 5), (True, 20), (False, 20)])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no_mask"])
def test_flash_attention_keeps_mps_meanings(lq, lk, dtype, is_causal, window, with_mask):
    """Causal and windows take flags that see the same keys (top_left_flags), a mask only where rows see none."""
    q, k, v = _inputs(lq, lk, dtype)
    masked_out = torch.rand(2, 1, lq, lk) < 0.3 if with_mask else None
    if with_mask:
        masked_out[..., 0] = False  # every row keeps a key
    # their positional order: query, key, value, is_causal, scale, attn_mask, window_size
    out = mfa.flash_attention(q, k, v, is_causal, 0.2, masked_out, window)
    _check(out, q, k, v, is_causal=is_causal, masked_out=masked_out, window=window, scale=0.2)


@pytest.mark.parametrize("lq,lk", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("chunk_size", [4, 16384])
def test_flash_attention_chunked_keeps_mps_meanings(lq, lk, dtype, is_causal, chunk_size):
    """Its flash_attention_chunked(query, key, value, chunk_size, is_causal, scale): causal top-left whatever the
    chunking (until session 27 this name was mfa_hf's own function: bottom-right, attn_mask 6th). Gradients too
    (theirs is inference only): a key that no row sees (Lq < Lk) gets zero gradients."""
    q, k, v = _inputs(lq, lk, dtype, grad=True)
    out = mfa.flash_attention_chunked(q, k, v, chunk_size, is_causal, 0.2)
    _check(out, q, k, v, is_causal=is_causal, scale=0.2)
    by_name = mfa.flash_attention_chunked(query=q, key=k, value=v, chunk_size=chunk_size, is_causal=is_causal,
                                          scale=0.2)
    assert torch.equal(by_name, out)
    if dtype == torch.float32:
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        grad = torch.randn_like(out)
        expected = torch.autograd.grad(mps_reference(*leaves, is_causal=is_causal, scale=0.2), leaves, grad.double())
        actual = torch.autograd.grad(out, (q, k, v), grad)
        for name, a, e in zip("qkv", actual, expected):
            torch.testing.assert_close(a.double(), e, atol=1e-4, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


# mps-flash-attn's parameter names per function (mpsops/mps-flash-attention bdd5e4d, mps_flash_attn/__init__.py):
# every name of its __all__ takes them in this order here (extra trailing parameters of ours are optional).
PEER_PARAMETERS = {
    "flash_attention": ["query", "key", "value", "is_causal", "scale", "attn_mask", "window_size", "bf16_backward"],
    "flash_attention_with_bias": ["query", "key", "value", "attn_bias", "is_causal", "scale", "window_size",
                                  "bias_repeat_count"],
    "flash_attention_chunked": ["query", "key", "value", "chunk_size", "is_causal", "scale"],
    "flash_attention_fp8": ["query", "key", "value", "k_scale", "v_scale", "is_causal", "attn_mask", "window_size",
                            "use_e5m2", "scale"],
    "flash_attention_int8": ["query", "key", "value", "k_scale", "v_scale", "is_causal", "attn_mask", "window_size",
                             "scale"],
    "flash_attention_nf4": ["query", "key", "value", "k_scale", "v_scale", "is_causal", "attn_mask", "window_size",
                            "scale"],
    "flash_attention_quantized": ["query", "key", "value", "k_scale", "v_scale", "quant_type", "is_causal",
                                  "attn_mask", "window_size", "scale"],
    "quantize_kv_fp8": ["key", "value", "use_e5m2"], "quantize_kv_int8": ["key", "value"],
    "quantize_kv_nf4": ["key", "value"], "convert_mask": ["attn_mask"],
    "replace_sdpa": [], "precompile": [], "clear_cache": [], "register_custom_op": [], "is_available": [],
}


@pytest.mark.parametrize("name", sorted(PEER_PARAMETERS))
def test_every_name_takes_mps_flash_attns_parameters_in_its_order(name):
    import inspect

    assert name in mfa.__all__
    parameters = list(inspect.signature(getattr(mfa, name)).parameters.values())
    assert [p.name for p in parameters[:len(PEER_PARAMETERS[name])]] == PEER_PARAMETERS[name]
    assert all(p.default is not inspect.Parameter.empty for p in parameters[len(PEER_PARAMETERS[name]):]), name


@pytest.mark.parametrize("lq,lk", LENGTHS)
@pytest.mark.parametrize("bias_shape", ["full", "broadcast", "3d"])
@pytest.mark.parametrize("is_causal,window,scale", [(False, 0, None), (True, 4, 0.3), (True, 0, None)])
def test_flash_attention_with_bias_adds_before_the_scale(lq, lk, bias_shape, is_causal, window, scale):
    q, k, v = _inputs(lq, lk, torch.float32)
    shape = {"full": (2, 3, lq, lk), "broadcast": (1, 3, lq, lk), "3d": (3, lq, lk)}[bias_shape]
    bias = torch.randn(shape) * 3
    out = mfa.flash_attention_with_bias(q, k, v, bias, is_causal, scale, window)
    _check(out, q, k, v, is_causal=is_causal, window=window, bias=bias, scale=scale)
    assert mfa_hf.flash_attention_with_bias is mfa.flash_attention_with_bias


def test_flash_attention_with_bias_gradients():
    q, k, v = _inputs(20, 20, torch.float32, grad=True)
    bias = torch.randn(1, 3, 20, 20)
    mfa.flash_attention_with_bias(q, k, v, bias, is_causal=True).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mps_reference(*leaves, is_causal=True, bias=bias).sum().backward()
    base = [t.detach().requires_grad_() for t in (q, k, v)]
    mps_reference(*base, is_causal=True, bias=bias, dtype=torch.float32).sum().backward()
    for name, ours, ref, bl in zip("qkv", (q, k, v), leaves, base):
        assert_close_to_reference(ours.grad, ref.grad, bl.grad, GRADIENT_FACTOR, name=f"d{name}")


def test_bias_repeat_count_reads_bias_of_batch_modulo_n():
    windows, batch = 3, 6
    q, k, v = _inputs(16, 16, torch.float32, b=batch)
    bias = torch.randn(windows, 3, 16, 16)
    out = mfa.flash_attention_with_bias(q, k, v, bias, bias_repeat_count=windows)
    _check(out, q, k, v, bias=bias[torch.arange(batch) % windows])
    one = bias[:1]
    torch.testing.assert_close(mfa.flash_attention_with_bias(q, k, v, one, bias_repeat_count=windows),
                               mfa.flash_attention_with_bias(q, k, v, one.expand(batch, -1, -1, -1).contiguous()))


def _dequantized(codes, scales, fmt, dtype):
    group = 32 // scales.shape[-1]  # head dim 32
    return dequantize_codes(codes.transpose(1, 2), scales.transpose(1, 2), fmt, group, dtype).transpose(1, 2)


@pytest.mark.parametrize("quant_type", [mfa.QUANT_FP8_E4M3, mfa.QUANT_FP8_E5M2, mfa.QUANT_INT8, mfa.QUANT_NF4])
@pytest.mark.parametrize("is_causal,window", [(False, 0), (True, 6), (True, 0), (False, 3), (True, 20)])
@pytest.mark.parametrize("lq,lk", LENGTHS)
def test_flash_attention_quantized_equals_attention_over_the_dequantized_cache(quant_type, is_causal, window, lq, lk):
    """Top-left causal and windows with Lq != Lk too: their flags need no mask, which quantized K/V do not take
    (Lq > Lk + window_size, whose rows past it see no key, is refused: test_bad_inputs_name_the_argument)."""
    q, k, v = _inputs(lq, lk, torch.float32)
    quantize = {3: mfa.quantize_kv_fp8, 4: lambda a, b: mfa.quantize_kv_fp8(a, b, use_e5m2=True),
                5: mfa.quantize_kv_int8, 6: mfa.quantize_kv_nf4}[quant_type]
    k_q, v_q, k_s, v_s = quantize(k, v)
    if window and lq > lk + window:  # only a mask says it
        with pytest.raises(NotImplementedError, match="window_size"):
            mfa.flash_attention_quantized(q, k_q, v_q, k_s, v_s, quant_type, is_causal, None, window)
        return
    out = mfa.flash_attention_quantized(q, k_q, v_q, k_s, v_s, quant_type, is_causal, None, window)
    fmt = FORMATS[quant_type]
    dk, dv = _dequantized(k_q, k_s, fmt, torch.float32), _dequantized(v_q, v_s, fmt, torch.float32)
    _check(out, q, dk, dv, is_causal=is_causal, window=window)
    named = {3: mfa.flash_attention_fp8, 5: mfa.flash_attention_int8, 6: mfa.flash_attention_nf4}.get(quant_type)
    if named is not None:
        torch.testing.assert_close(named(q, k_q, v_q, k_s, v_s, is_causal, None, window), out, rtol=0, atol=0)
    assert (mfa_hf.QUANT_FP8_E4M3, mfa_hf.QUANT_FP8_E5M2, mfa_hf.QUANT_INT8, mfa_hf.QUANT_NF4) == (3, 4, 5, 6)


def test_quantize_kv_takes_its_source_and_its_readme_call_shapes():
    k, v = torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64)
    four = mfa.quantize_kv_int8(k, v)
    two = mfa.quantize_kv_int8(k)
    assert len(four) == 4 and len(two) == 2 and torch.equal(four[0], two[0]) and torch.equal(four[2], two[1])


def test_convert_mask():
    assert mfa.convert_mask(None) is None
    m = torch.rand(2, 1, 4, 5) < 0.5
    assert mfa.convert_mask(m) is m
    additive = torch.tensor([0.0, -999.0, -1e3, -1e4, -math.inf])
    assert mfa.convert_mask(additive).tolist() == [False, False, True, True, True]
    with pytest.raises(TypeError, match="attn_mask"):
        mfa.convert_mask(torch.zeros(3, dtype=torch.int32))
    # Its output feeds this module's flash_attention (True = masked out), the same as the float mask there:
    q, k, v = _inputs(12, 12, torch.float32)
    float_mask = torch.where(torch.rand(12, 12) < 0.3, -math.inf, 0.0)
    float_mask[:, 0] = 0.0
    _check(mfa.flash_attention(q, k, v, attn_mask=mfa.convert_mask(float_mask)[None, None]), q, k, v,
           masked_out=float_mask < 0)


@pytest.mark.parametrize("shape, message", [((12,), "must be 2D/3D/4D"), ((1, 2, 1, 12, 12), "must be 2D/3D/4D"),
                                            ((1, 1, 12, 5), "shape mismatch"), ((1, 1, 7, 12), "shape mismatch"),
                                            ((12, 5), "shape mismatch"), ((4, 12, 12), "batch size must be 1 or 2")])
def test_masks_are_checked_as_mps_flash_attn_checks_them(shape, message):
    """Its flash_attention (0.6.3) takes 4-D masks (B or 1, H or 1, Lq or 1, Lk or 1), and 2-D (N_q, N_kv) and 3-D
    (B, N_q, N_kv) ones promoted to 4-D (0.5 refused those: a peer-suite run found the change, session 25);
    ValueError otherwise."""
    q, k, v = _inputs(12, 12, torch.float32)
    with pytest.raises(ValueError, match=f"attn_mask {message}"):
        mfa.flash_attention(q, k, v, attn_mask=torch.zeros(shape, dtype=torch.bool))
    for served in ((2, 1, 1, 12), (1, 3, 12, 1)):
        mfa.flash_attention(q, k, v, attn_mask=torch.zeros(served, dtype=torch.bool))
    g = torch.Generator().manual_seed(4)
    for promoted in ((12, 12), (2, 12, 12)):  # the 3-D mask's first dim is the batch, as 0.6.3 reads it
        masked_out = torch.rand(promoted, generator=g) > 0.6
        masked_out[..., 0] = False
        four_d = masked_out[None, None] if masked_out.dim() == 2 else masked_out[:, None]
        _check(mfa.flash_attention(q, k, v, attn_mask=masked_out), q, k, v, masked_out=four_d)


def test_scale_and_rank_errors_are_mps_flash_attns():
    """scale <= 0: ValueError "scale must be positive"; a scale 100x off 1/sqrt(D) warns as there; a query that is
    not 4-D raises what catches as its RuntimeError and as our ValueError."""
    q, k, v = _inputs(12, 12, torch.float32)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="scale must be positive"):
            mfa.flash_attention(q, k, v, scale=bad)
    with pytest.warns(UserWarning, match="very different from default"):
        mfa.flash_attention(q, k, v, scale=100.0)
    for error in (RuntimeError, ValueError):
        with pytest.raises(error, match="query must be 4D"):
            mfa.flash_attention(q[0], k, v)
    assert not hasattr(mfa_hf, "convert_mask")  # mfa_hf.flash_attention reads bool masks the other way


def test_is_available_precompile_clear_cache_off_a_mac(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert mfa.is_available() is False and mfa_hf.is_available is mfa.is_available
    done = mfa.precompile()
    assert done["device"] is None and done["compiled"] == [] and "nothing to compile" in done["note"]
    assert mfa.clear_cache()["cleared"] == 0


def test_precompile_on_a_mac_compiles_every_planned_variant(monkeypatch):
    from mfa_hf.doctor import variants
    from mfa_hf.kernels.metal import loader

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    compiled = []
    monkeypatch.setattr(loader, "library", lambda variant, device, count: compiled.append((variant, device.type)))
    planned = [p for p in variants.enumerate_variants(quick=True, device_type="mps").planned if not p.error]
    done = mfa.precompile()
    assert done["device"] == "mps" and done["compiled"] == [p.id for p in planned] and not done["failed"]
    assert len(compiled) == len(planned) > 0 and {d for _, d in compiled} == {"mps"}


@pytest.mark.parametrize("call,match,error", [
    (lambda q, k, v: mfa.flash_attention(q, k, v, scale=0.0), "scale", ValueError),
    (lambda q, k, v: mfa.flash_attention(q, k, v, scale=-1.0), "scale", ValueError),
    (lambda q, k, v: mfa.flash_attention(q, k, v, window_size=-2), "window_size", ValueError),
    (lambda q, k, v: mfa.flash_attention(q, k, v, attn_mask=torch.zeros(8, 8)), "attn_mask", TypeError),
    (lambda q, k, v: mfa.flash_attention(q[0], k, v), "query", ValueError),
    (lambda q, k, v: mfa.flash_attention(q, k, v, is_causal=1), "is_causal", TypeError),
    # kinds a sweep found crashing or truncated: a list mask (AttributeError), a str or tuple window (TypeError
    # without the name), a float or bool window (silently int()-ed)
    (lambda q, k, v: mfa.flash_attention(q, k, v, attn_mask=[[True]]), "attn_mask: expected a torch.Tensor", TypeError),
    (lambda q, k, v: mfa.flash_attention(q, k, v, window_size="3"), "window_size", TypeError),
    (lambda q, k, v: mfa.flash_attention(q, k, v, window_size=(1, 1)), "window_size", TypeError),
    (lambda q, k, v: mfa.flash_attention(q, k, v, window_size=2.5), "window_size", TypeError),
    (lambda q, k, v: mfa.flash_attention(q, k, v, window_size=True), "window_size", TypeError),
    (lambda q, k, v: mfa.flash_attention_quantized(q, *mfa.quantize_kv_int8(k, v), 5, window_size=2.0),
     "window_size", TypeError),
    (lambda q, k, v: mfa.flash_attention(q, k, v, scale="0.1"), "scale", TypeError),
    (lambda q, k, v: mfa.flash_attention_with_bias(q, k, v, torch.zeros(8, 8)), "attn_bias", ValueError),
    (lambda q, k, v: mfa.flash_attention_with_bias(q, k, v, torch.zeros(1, 2, 8, 8, dtype=torch.int64)),
     "attn_bias", TypeError),
    (lambda q, k, v: mfa.flash_attention_with_bias(q, k, v, torch.zeros(1, 2, 8, 8), bias_repeat_count=-1),
     "bias_repeat_count", ValueError),
    (lambda q, k, v: mfa.flash_attention_with_bias(q, k, v, torch.zeros(2, 2, 8, 8), bias_repeat_count=3),
     "bias_repeat_count", ValueError),
    (lambda q, k, v: mfa.flash_attention_quantized(q, *mfa.quantize_kv_int8(k, v), 7), "quant_type", ValueError),
    # the one top-left visibility that only a mask says (rows past Lk + window_size see no key); quantized K/V take
    # no mask here
    (lambda q, k, v: mfa.flash_attention_quantized(q, *mfa.quantize_kv_int8(k[:, :, :3], v[:, :, :3]), 5, True, None,
                                                   2), "is_causal", NotImplementedError),
    (lambda q, k, v: mfa.flash_attention_quantized(q, *mfa.quantize_kv_int8(k, v), 5,
                                                   attn_mask=torch.zeros(8, 8, dtype=torch.bool)), "attn_mask",
     ValueError),
    (lambda q, k, v: mfa.flash_attention_quantized(q, k, v, torch.ones(1), torch.ones(1), 5), "k_scale|key",
     ValueError),
])
def test_bad_inputs_name_the_argument(call, match, error):
    q, k, v = _inputs(8, 8, torch.float32, h=2)
    with pytest.raises(error, match=match):
        call(q, k, v)


def test_numpy_scalars_are_taken_as_their_values():
    """numpy bools, ints and floats work in mps-flash-attn (plain Python comparisons); they gave 'expected a bool,
    got bool' or 'scale must be positive' for a positive numpy scale."""
    import numpy

    q, k, v = _inputs(8, 8, torch.float32, h=2)
    want = mfa.flash_attention(q, k, v, True, 0.3, None, 2)
    got = mfa.flash_attention(q, k, v, numpy.bool_(True), numpy.float32(0.3), None, numpy.int64(2))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
