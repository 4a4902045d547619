"""What each autograd mode gets from our attention, on every entry point: reverse mode is served (tests elsewhere);
forward mode (dual tensors, torch.func.jvp / jacfwd / hessian) and a gradient of a gradient (create_graph=True,
jacrev of grad) are refused by name; the new tokens flash_attn_with_kvcache appends carry no gradient, and a backward
that needs one is refused by name. Before: a kernel's output carried no tangent (a silent zero), create_graph met
torch's "no autograd formula" advice, and the appended tokens' gradients stayed None without a word.
tests/metal/test_metal_autograd_modes.py runs the same checks on the metal backend (mfa_hf/testing_autograd_modes.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

import mfa_hf
from mfa_hf.testing_autograd_modes import (
    CASES,
    ENTRY_POINTS,
    FORWARD_MODE,
    check_append_refuses_backward,
    check_double_backward_refused,
    check_tangent_refused,
    tensors,
)


@pytest.fixture(params=["torch", "auto"])
def backend(request, monkeypatch):
    """Our torch backend, and the default routing (the platform's kernel where it is exact)."""
    monkeypatch.setenv("MFA_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize(("entry", "name"), CASES)
def test_a_tangent_is_refused_by_name(entry, name, backend):
    check_tangent_refused(entry, name)


@pytest.mark.parametrize("entry", ["flash_attn_func", "flash_attention", "flash_attn_varlen_func"])
def test_jvp_and_hessian_are_refused_by_name(entry, backend):
    inputs = tensors(1)
    call = ENTRY_POINTS[entry]

    def of_q(q):
        return call(**dict(inputs, q=q))

    q = inputs["q"]
    expected = FORWARD_MODE if backend == "torch" else f"{FORWARD_MODE}|forward AD"  # the native kernel: torch's words
    with pytest.raises(NotImplementedError, match=expected):
        torch.func.jvp(of_q, (q,), (torch.ones_like(q),))
    with pytest.raises(NotImplementedError, match=f"{expected}|no double backward"):
        torch.func.hessian(lambda q: of_q(q).sum())(q)


@pytest.mark.parametrize("entry", ["flash_attn_func", "flash_attention", "flash_attn_varlen_func"])
def test_a_gradient_of_a_gradient_is_refused_by_name(entry, monkeypatch):
    monkeypatch.setenv("MFA_BACKEND", "torch")  # the platform's kernels have their own double backward, or none
    check_double_backward_refused(entry)


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("needs", ["k", "v", "k and v", "q and k"])
@pytest.mark.parametrize("cache", ["plain", "int8"])
def test_appended_tokens_refuse_a_backward_by_name(needs, cache, return_lse, backend):
    check_append_refuses_backward(needs, cache, return_lse)


def test_the_native_route_reads_no_tensor_that_requires_grad(monkeypatch):
    """Its checks read the output on the host off the graph: no 'converting a tensor with requires_grad' warning."""
    monkeypatch.delenv("MFA_BACKEND", raising=False)
    inputs = tensors(4)
    q = inputs["q"].requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mfa_hf.flash_attn_func(q, inputs["k"], inputs["v"]).sum().backward()
    assert q.grad is not None
