"""Our attention under functorch transforms (torch.func.grad, vjp, jacrev, vmap): the gradients of the float64
reference, per-sample gradients through vmap(grad), and a clear refusal of what the op cannot give (a gradient of
its gradient). torch.library's own autograd wrapper raises under every functorch transform, even where no
gradient of it is needed, so these calls take ops.py's transform-form autograd.Function instead."""

import pytest
import torch

import mfa_hf
from mfa_hf.testing import Case, check_against_reference, functorch_vjp

CASES = [  # tests/triton and tests/metal run the same check with their backends
    Case(causal=True),
    Case(lq=50, lk=37, window=(7, 3), softcap=3.0),
    Case(heads_q=4, heads_kv=1, dim=24, dim_v=40, sinks=True, alibi=True),
    Case(mask="additive", strided=True, causal=True),
    Case(lq=37, lk=50, mask="bool", sinks=True, softcap=2.0),
    Case(dtype=torch.bfloat16, causal=True, window=(11, 0), sinks=True),
]


@pytest.fixture(autouse=True)
def our_op(monkeypatch):
    monkeypatch.setenv("MFA_BACKEND", "torch")  # our op, not the native route (its transforms are torch's)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_vjp_gives_the_reference_gradients(case):
    check_against_reference(case, backend="torch", seed=5, vjp=functorch_vjp(case, "torch"))


def test_grad_of_every_input_equals_autograd():
    """torch.func.grad over q, k, v, sinks and an additive mask at once: the same numbers as eager autograd
    through the same kernel."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 19, 4, 16, generator=g) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]
    sinks, mask = torch.randn(4, generator=g), torch.randn(2, 4, 19, 19, generator=g)
    weights = torch.randn(2, 19, 4, 16, generator=g)

    def loss(q, k, v, sinks, mask):
        out = mfa_hf.flash_attn_func(q, k, v, causal=True, softcap=4.0, sinks=sinks, attn_mask=mask)
        return (out * weights).sum()

    transformed = torch.func.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, sinks, mask)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks, mask)]
    eager = torch.autograd.grad(loss(*leaves), leaves)
    for name, ours, theirs in zip("q k v sinks mask".split(), transformed, eager):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6, msg=lambda m: f"d{name}: {m}")


def test_per_sample_gradients_through_vmap_of_grad():
    """vmap(grad(...)) over a batch of samples (the per-sample-gradient recipe): each sample's gradient equals
    that sample's own eager gradient."""
    g = torch.Generator().manual_seed(3)
    samples = torch.randn(3, 1, 13, 2, 8, generator=g)
    k, v = torch.randn(1, 21, 2, 8, generator=g), torch.randn(1, 21, 2, 8, generator=g)

    def loss(q):
        return mfa_hf.flash_attn_func(q, k, v, window_size=(5, 2), softcap=3.0).square().sum()

    batched = torch.func.vmap(torch.func.grad(loss))(samples)
    for n, sample in enumerate(samples):
        leaf = sample.clone().requires_grad_()
        (expected,) = torch.autograd.grad(loss(leaf), leaf)
        torch.testing.assert_close(batched[n], expected, rtol=1e-5, atol=1e-6)


def test_jacrev_matches_autograd_row_by_row():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 3, 1, 4, generator=g) for _ in range(3))
    jacobian = torch.func.jacrev(lambda q: mfa_hf.flash_attn_func(q, k, v, causal=True, softcap=2.0))(q)
    assert jacobian.shape == (1, 3, 1, 4) * 2
    leaf = q.clone().requires_grad_()
    out = mfa_hf.flash_attn_func(leaf, k, v, causal=True, softcap=2.0)
    for index in range(out.numel()):
        (row,) = torch.autograd.grad(out.flatten()[index], leaf, retain_graph=True)
        torch.testing.assert_close(jacobian.flatten(0, 3)[index], row, rtol=1e-6, atol=1e-7)


def test_gradient_of_a_gradient_is_refused_by_name():
    """jacrev of grad (a Hessian by reverse mode twice) needs the backward's own backward, which the op has not:
    a clear error naming it, not a wrong zero."""
    q, k, v = (torch.randn(1, 5, 1, 4) for _ in range(3))

    def loss(q):
        return mfa_hf.flash_attn_func(q, k, v, softcap=2.0).square().sum()

    with pytest.raises(NotImplementedError, match="no double backward"):
        torch.func.jacrev(torch.func.grad(loss))(q)


def test_decode_under_transforms_batches_and_refuses_a_gradient_by_name():
    """flash_attn_with_kvcache under vmap gives each sample's own decode; under torch.func.grad it raises the
    decode's own refusal (it computes no gradients), as eager autograd does, not torch's functorch error."""
    from mfa_hf.ops import DECODE_HAS_NO_BACKWARD

    g = torch.Generator().manual_seed(6)
    queries = torch.randn(3, 2, 1, 4, 16, generator=g)
    k_cache, v_cache = torch.randn(2, 32, 2, 16, generator=g), torch.randn(2, 32, 2, 16, generator=g)

    def decode(q):
        return mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=20, softcap=3.0)

    batched = torch.func.vmap(decode)(queries)
    for n, q in enumerate(queries):
        torch.testing.assert_close(batched[n], decode(q), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="expected no backward through a decode") as raised:
        torch.func.grad(lambda q: decode(q).sum())(queries[0])
    assert str(raised.value) == DECODE_HAS_NO_BACKWARD


def test_compiled_vmap_still_goes_through_the_op():
    """torch.compile over vmap: dynamo traces the transform itself, so the call takes the registered op as before
    (the transform-form autograd.Function is for eager transforms only; dynamo fails on its context)."""
    g = torch.Generator().manual_seed(7)
    queries = torch.randn(3, 1, 9, 2, 8, generator=g)
    k, v = torch.randn(1, 9, 2, 8, generator=g), torch.randn(1, 9, 2, 8, generator=g)

    def attend(q):
        return mfa_hf.flash_attn_func(q, k, v, softcap=2.0)

    compiled = torch.compile(torch.func.vmap(attend), backend="eager", fullgraph=True)
    expected = torch.stack([attend(q) for q in queries])
    torch.testing.assert_close(compiled(queries), expected, rtol=0, atol=0)
