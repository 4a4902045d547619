"""Our attention under functorch transforms (torch.func.grad, vjp, jacrev, vmap): the gradients of the float64
reference, per-sample gradients through vmap(grad), and a clear refusal of what the op cannot give (a gradient of
its gradient). torch.library's own autograd wrapper raises under every functorch transform, even where no
gradient of it is needed, so these calls take ops.py's transform-form autograd.Function instead."""

import warnings

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

    batched, _, _ = _vmapped(decode, 0, queries)
    for n, q in enumerate(queries):  # one batched call: the same math, other float32 roundings
        torch.testing.assert_close(batched[n], decode(q), rtol=1e-5, atol=1e-6)
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
    # the batching rule makes the 3 samples one batched call: the same math, other float32 roundings
    torch.testing.assert_close(compiled(queries), expected, rtol=1e-5, atol=1e-6)


# ---- vmap's batching rule (mfa_hf/op_vmap.py): the samples fold into the batch, one kernel call ----------------

def _attention_calls(calls, op: str) -> int:
    return sum(n for key, n in calls.items() if key[1] == op)


def _vmapped(fn, in_dims, *args):
    """torch.func.vmap(fn)(*args) and the forward and backward calls it made; torch's "performance drop" warning
    (its per-sample fallback loop) fails the test."""
    from mfa_hf import trace

    with warnings.catch_warnings(record=True) as caught, trace.capture() as calls:
        warnings.simplefilter("always")
        result = torch.func.vmap(fn, in_dims=in_dims)(*args)
    dropped = [str(w.message) for w in caught if "performance drop" in str(w.message)]
    assert not dropped, dropped
    return result, _attention_calls(calls, "fwd"), _attention_calls(calls, "bwd")


FOLD_CASES = {  # name -> (the call's keywords from the generator, (q, k, v) in_dims and the keyword vmapped too)
    "q-only": (lambda g: {}, (0, None, None, None)),
    "q-on-dim-2-kv-batched": (lambda g: {}, (2, 0, 0, None)),
    "gqa-window-softcap": (lambda g: dict(window_size=(4, 1), softcap=2.0), (0, None, None, None)),
    "shared-bool-mask": (lambda g: dict(attn_mask=torch.rand(1, 1, 11, 13, generator=g) > 0.3), (0, None, None, None)),
    "2d-additive-mask": (lambda g: dict(attn_mask=torch.randn(11, 13, generator=g)), (0, 0, None, None)),
    "per-row-mask-batched": (lambda g: dict(attn_mask=torch.randn(3, 2, 4, 11, 13, generator=g)), (0, None, None, "attn_mask")),
    "alibi-per-head": (lambda g: dict(alibi_slopes=torch.rand(4, generator=g)), (None, 0, 0, None)),
    "alibi-per-row-batched": (lambda g: dict(alibi_slopes=torch.rand(3, 2, 4, generator=g)), (0, None, None, "alibi_slopes")),
    "shared-sinks": (lambda g: dict(sinks=torch.randn(4, generator=g)), (0, None, None, None)),
}


def _fold_problem(name):
    g = torch.Generator().manual_seed(len(name))
    make, dims = FOLD_CASES[name]
    kwargs = make(g)
    q = torch.randn(3, 2, 11, 4, 8, generator=g)
    k, v = torch.randn(3, 2, 13, 2, 8, generator=g), torch.randn(3, 2, 13, 2, 8, generator=g)
    q = q.movedim(0, dims[0]) if dims[0] is not None else q[0]
    k = k if dims[1] is not None else k[0]
    v = v if dims[2] is not None else v[0]
    extra = dims[3]
    batched_extra = kwargs.pop(extra) if extra else None
    return q, k, v, kwargs, dims, extra, batched_extra


@pytest.mark.parametrize("name", FOLD_CASES)
def test_vmap_runs_one_call_equal_to_each_sample(name):
    q, k, v, kwargs, dims, extra, batched_extra = _fold_problem(name)

    def attend(q, k, v, extra_value):
        more = {extra: extra_value} if extra else {}
        return mfa_hf.flash_attn_func(q, k, v, causal=True, **kwargs, **more)

    in_dims = (*dims[:3], 0 if extra else None)  # dims[3]: the keyword batched over the samples, if any
    out, forwards, _ = _vmapped(attend, in_dims, q, k, v, batched_extra)
    assert forwards == 1, f"expected the 3 samples in one forward call, got {forwards}"
    for n in range(3):
        sample = [t.select(d, n) if d is not None else t for t, d in zip((q, k, v, batched_extra), in_dims)]
        torch.testing.assert_close(out[n], attend(*sample), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mask_shape", [(1, 1, 11, 13), (2, 4, 11, 13), (11, 13), (2, 1, 11, 13)])
def test_per_sample_gradients_fold_with_a_mask_gradient(mask_shape):
    """vmap(grad) over q, k, v and an additive mask shared by the samples: one backward call, and each sample's
    gradients (the mask's summed over that sample's own batch rows, in the mask's own shape) equal its eager ones."""
    g = torch.Generator().manual_seed(8)
    samples = torch.randn(3, 2, 11, 4, 8, generator=g)
    k, v = torch.randn(2, 13, 2, 8, generator=g), torch.randn(2, 13, 2, 8, generator=g)
    mask = torch.randn(mask_shape, generator=g)

    def loss(q, k, v, mask):
        return mfa_hf.flash_attn_func(q, k, v, attn_mask=mask, softcap=3.0).square().sum()

    grads, forwards, backwards = _vmapped(torch.func.grad(loss, argnums=(0, 1, 2, 3)), (0, None, None, None),
                                          samples, k, v, mask)
    assert (forwards, backwards) == (1, 1)
    for n, sample in enumerate(samples):
        leaves = [t.clone().requires_grad_() for t in (sample, k, v, mask)]
        expected = torch.autograd.grad(loss(*leaves), leaves)
        for name, ours, theirs in zip(("q", "k", "v", "mask"), grads, expected):
            torch.testing.assert_close(ours[n], theirs, rtol=1e-5, atol=1e-6, msg=lambda m: f"d{name} sample {n}: {m}")


def test_jacrev_folds_its_cotangents_into_one_backward():
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 3, 1, 4, generator=g) for _ in range(3))
    from mfa_hf import trace

    with trace.capture() as calls:
        torch.func.jacrev(lambda q: mfa_hf.flash_attn_func(q, k, v, causal=True))(q)
    assert _attention_calls(calls, "bwd") == 1


def test_sinks_gradient_and_packed_sequences_keep_one_call_per_sample():
    """What folding would get wrong keeps the per-sample loop: a sinks gradient (one sum over the whole batch in the
    kernel) and packed sequences (cu_seqlens index the packed rows). Both still equal each sample's own result."""
    from mfa_hf import trace

    g = torch.Generator().manual_seed(10)
    samples = torch.randn(3, 2, 9, 4, 8, generator=g)
    k, v, sinks = torch.randn(2, 9, 2, 8, generator=g), torch.randn(2, 9, 2, 8, generator=g), torch.randn(4, generator=g)

    def loss(q, sinks):
        return mfa_hf.flash_attn_func(q, k, v, sinks=sinks, causal=True).square().sum()

    with trace.capture() as calls:
        dq, dsinks = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(0, None))(samples, sinks)
    assert (_attention_calls(calls, "fwd"), _attention_calls(calls, "bwd")) == (1, 3)
    for n, sample in enumerate(samples):
        leaves = [sample.clone().requires_grad_(), sinks.clone().requires_grad_()]
        eq, es = torch.autograd.grad(loss(*leaves), leaves)
        torch.testing.assert_close(dq[n], eq, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dsinks[n], es, rtol=1e-5, atol=1e-6)

    packed = torch.randn(3, 12, 4, 8, generator=g)
    pk, pv = torch.randn(12, 2, 8, generator=g), torch.randn(12, 2, 8, generator=g)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)

    def varlen(q):
        return mfa_hf.flash_attn_varlen_func(q, pk, pv, cu, cu, 7, 7, causal=True)

    with trace.capture() as calls:
        out = torch.func.vmap(varlen)(packed)
    assert _attention_calls(calls, "fwd") == 3
    for n, q in enumerate(packed):
        torch.testing.assert_close(out[n], varlen(q), rtol=0, atol=0)


@pytest.mark.parametrize("kv_format", ["none", "int8", "nf4"])
def test_vmap_over_decode_queries_reads_the_shared_cache_in_one_call(kv_format):
    """Queries vmapped over a cache shared by the samples (with a row map, per-row lengths and ALiBi slopes batched
    too): one decode call through cache_batch_idx (the cache is not copied), each sample equal to its own call."""
    from mfa_hf import trace

    g = torch.Generator().manual_seed(11)
    queries = torch.randn(3, 2, 1, 4, 64, generator=g)
    k, v = torch.randn(5, 40, 2, 64, generator=g), torch.randn(5, 40, 2, 64, generator=g)
    k_cache, v_cache = (k, v) if kv_format == "none" else (mfa_hf.quantize_kv(k, kv_format),
                                                           mfa_hf.quantize_kv(v, kv_format))
    rows = torch.tensor([4, 1], dtype=torch.int32)
    lengths = torch.tensor([[30, 12], [25, 40], [1, 7]], dtype=torch.int32)
    slopes = torch.rand(3, 4, generator=g)

    def decode(q, seqlens, alibi):
        return mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, cache_batch_idx=rows,
                                              alibi_slopes=alibi, softcap=3.0)

    with trace.capture() as calls:
        batched, _, _ = _vmapped(decode, (0, 0, 0), queries, lengths, slopes)
    assert _attention_calls(calls, "decode") == 1
    for n in range(3):
        torch.testing.assert_close(batched[n], decode(queries[n], lengths[n], slopes[n]), rtol=1e-5, atol=1e-6)


def test_vmap_with_a_mask_batched_on_an_inner_dim_and_its_gradient():
    """A (Lq, samples, Lk) mask vmapped on dim 1 (a 2-D mask per sample) and q on dim 0: outputs and per-sample
    gradients of q and the mask equal each sample's own, in one forward and one backward call."""
    g = torch.Generator().manual_seed(12)
    samples = torch.randn(3, 2, 11, 4, 8, generator=g)
    k, v = torch.randn(2, 13, 2, 8, generator=g), torch.randn(2, 13, 2, 8, generator=g)
    masks = torch.randn(11, 3, 13, generator=g)

    def loss(q, mask):
        return mfa_hf.flash_attn_func(q, k, v, attn_mask=mask, softcap=3.0).square().sum()

    grads, forwards, backwards = _vmapped(torch.func.grad(loss, argnums=(0, 1)), (0, 1), samples, masks)
    assert (forwards, backwards) == (1, 1)
    for n in range(3):
        leaves = [samples[n].clone().requires_grad_(), masks[:, n].clone().requires_grad_()]
        expected = torch.autograd.grad(loss(*leaves), leaves)
        for name, ours, theirs in zip(("q", "mask"), grads, expected):
            torch.testing.assert_close(ours[n], theirs, rtol=1e-5, atol=1e-6, msg=lambda m: f"d{name} sample {n}: {m}")
