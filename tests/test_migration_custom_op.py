"""torch.ops.mfa.flash_attention (mfa_hf.register_custom_op): mps-flash-attn's op name, schema and argument
meanings, served by our ops; eager and torch.compile(fullgraph=True), forward and backward, against the
float64 reference."""

from __future__ import annotations

import pytest
import torch

import mfa_hf
from mfa_hf import custom_op_alias, trace
from mfa_hf.kernels.reference import attention_reference
from mfa_hf.testing import GRADIENT_FACTOR, assert_close_to_reference


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setenv("MFA_BACKEND", "torch")  # our kernel, so that the trace can prove it ran
    assert mfa_hf.register_custom_op() is True
    assert mfa_hf.register_custom_op() is True  # idempotent


CASES = {  # id: (B, Hq, Hkv, Lq, Lk, D, is_causal, window_size (mps-flash-attn's int), mask kind)
    "full": (2, 4, 4, 33, 33, 16, False, None, "none"),
    "causal-gqa": (2, 4, 2, 33, 33, 24, True, 0, "none"),
    "causal-window5": (1, 4, 1, 40, 40, 16, True, 5, "none"),
    "window7-not-causal": (1, 2, 2, 29, 29, 16, False, 7, "none"),
    "bool-mask-lq<lk": (2, 2, 2, 21, 37, 16, False, None, "bool"),
    "uint8-mask-causal-lq>lk": (1, 2, 2, 37, 21, 16, True, 3, "uint8"),
}


def _inputs(case, seed):
    b, hq, hkv, lq, lk, d, _, _, mask_kind = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).requires_grad_()
    k = torch.randn(b, hkv, lk, d, generator=g).requires_grad_()
    v = torch.randn(b, hkv, lk, d, generator=g).requires_grad_()
    masked_out = None
    if mask_kind != "none":
        masked_out = torch.rand(b, 1, lq, lk, generator=g) < 0.3  # mps-flash-attn: True = masked out
        masked_out[:, :, lq // 2] = True  # a fully masked row gives 0
        if mask_kind == "uint8":
            masked_out = masked_out.to(torch.uint8)
    return q, k, v, masked_out


def _reference(q, k, v, case, masked_out, upcast):
    """Our reference with mps-flash-attn's window (w keys before the own one), mask polarity and top-left
    alignment of causal/window when Lq != Lk (its kernel masks j > i and j < i - w)."""
    _, _, _, lq, lk, _, causal, window, _ = case
    pair = (-1, -1) if not window else (window, 0 if causal else -1)
    keep = None if masked_out is None else masked_out == 0
    if lq != lk and (causal or window):
        rows, cols = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
        visible = (cols <= rows) if causal else torch.ones(lq, lk, dtype=torch.bool)
        if window:
            visible = visible & (cols >= rows - window)
        keep = visible if keep is None else keep & visible
        causal, pair = False, (-1, -1)
    dtype = torch.float64 if upcast else q.dtype
    leaves = [t.detach().to(dtype).transpose(1, 2).requires_grad_() for t in (q, k, v)]
    out, _ = attention_reference(*leaves, causal=causal, window_size=pair, attn_mask=keep, upcast=upcast)
    return out.transpose(1, 2), leaves


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-fullgraph"])
@pytest.mark.parametrize("name", list(CASES))
def test_alias_matches_reference_forward_and_backward(name, compiled):
    case = CASES[name]
    q, k, v, masked_out = _inputs(case, seed=len(name))
    causal, window = case[6], case[7]

    def attention(a, b, c, mask):
        return torch.ops.mfa.flash_attention(a, b, c, causal, mask, window)

    run = torch.compile(attention, fullgraph=True, dynamic=False) if compiled else attention
    grad = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], generator=torch.Generator().manual_seed(7))
    with trace.capture() as calls:
        out = run(q, k, v, masked_out)
        ours = torch.autograd.grad(out, (q, k, v), grad)
    served = trace.served_by(calls)
    assert served[("torch", "fwd")] == 1 and served[("torch", "bwd")] == 1, dict(served)
    ref, ref_leaves = _reference(q, k, v, case, masked_out, upcast=True)
    base, base_leaves = _reference(q, k, v, case, masked_out, upcast=False)
    assert_close_to_reference(out, ref, base, name="out")
    want = torch.autograd.grad(ref, ref_leaves, grad.double())
    baseline = torch.autograd.grad(base, base_leaves, grad)
    for label, g, w, b in zip("qkv", ours, want, baseline):
        assert_close_to_reference(g, w.transpose(1, 2), b.transpose(1, 2), GRADIENT_FACTOR, f"d{label}")


def test_readme_call_with_none_window_is_full_attention():
    q, k, v, _ = _inputs(CASES["full"], seed=1)
    out = torch.ops.mfa.flash_attention(q, k, v, False, None, None)
    assert torch.equal(out, mfa_hf.flash_attention(q, k, v))
    assert torch.equal(torch.ops.mfa.flash_attention(q, k, v), out)  # schema defaults


def test_window_translation_is_mps_flash_attn_meaning():
    """w counts the keys before the query's own: w + 1 keys with causal (mfa_hf.flash_attention's w: w keys)."""
    assert custom_op_alias.mps_window(None, True) is None
    assert custom_op_alias.mps_window(0, True) is None
    assert custom_op_alias.mps_window(4, True) == (4, 0)
    assert custom_op_alias.mps_window(4, False) == (4, -1)
    q, k, v, _ = _inputs(CASES["causal-window5"], seed=2)
    assert torch.equal(torch.ops.mfa.flash_attention(q, k, v, True, None, 4),
                       mfa_hf.flash_attention(q, k, v, is_causal=True, window_size=5))


def test_bad_arguments_name_themselves():
    q, k, v, _ = _inputs(CASES["full"], seed=3)
    with pytest.raises(TypeError, match=r"attn_mask: .*bool or uint8 mask \(True = masked out\), got torch.float32"):
        torch.ops.mfa.flash_attention(q, k, v, False, torch.zeros(1, 1, 33, 33), None)
    with pytest.raises(ValueError, match=r"window_size: expected 0 or None .* got -2"):
        torch.ops.mfa.flash_attention(q, k, v, True, None, -2)


def test_a_name_taken_by_another_package_is_refused(monkeypatch):
    namespace = "mfa_migration_test"
    other = torch.library.Library(namespace, "FRAGMENT")
    other.define(f"{custom_op_alias.NAME}(Tensor query) -> Tensor")
    monkeypatch.setattr(custom_op_alias, "NAMESPACE", namespace)
    monkeypatch.setattr(custom_op_alias, "_library", None)
    with pytest.raises(RuntimeError, match=rf"torch.ops.{namespace}.flash_attention is already defined"):
        custom_op_alias.register_custom_op()
