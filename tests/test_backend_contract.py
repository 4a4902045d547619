"""A new backend is its folder plus one registry line (issue 18): a toy backend built only from the
contract (kernels/contract.py) and the float64 reference serves the public functions, with custom ops,
autograd, the trace and MFA_BACKEND, without touching mfa_hf."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import mfa_hf
from mfa_hf import dispatch, trace
from mfa_hf.kernels.contract import Backend, BackendDefinition
from mfa_hf.kernels.reference import attention_reference

NAME = "toycontract"


def _forward(call):
    o = call.options
    out, lse = attention_reference(call.q, call.k, call.v, softmax_scale=o.scale, window_size=o.window,
                                   softcap=o.softcap, sinks=call.sinks, attn_mask=call.attn_mask)
    return out.to(call.q.dtype), lse.float()


def _backward(call, grads):
    # Inside a custom op autograd does not record: the toy hands its backward to the torch backend's
    # implementation, which takes the same call objects.
    return dispatch.backend("torch").impl.backward(call, grads)


def _supports(problem):
    if problem.varlen or problem.kv_format != "none" or problem.dropout_p or problem.has_alibi:
        return False, "the toy backend serves dense calls only"
    return True, "the toy backend serves dense calls"


def _decode(call):
    raise NotImplementedError("no decode")


@pytest.fixture
def toy_backend(monkeypatch):
    module = types.ModuleType("toy_contract_backend")
    module.BACKEND = BackendDefinition(NAME, _supports, _forward, _backward, _decode)
    monkeypatch.setitem(sys.modules, "toy_contract_backend", module)
    monkeypatch.setattr(dispatch, "REGISTRY", dispatch.REGISTRY + ((NAME, "toy_contract_backend"),))
    monkeypatch.setattr(dispatch, "PRIORITY", dispatch.PRIORITY + (NAME,))
    monkeypatch.setattr(dispatch, "_MODULES", dict(dispatch.REGISTRY))
    monkeypatch.setenv("MFA_BACKEND", NAME)
    return module.BACKEND


def test_the_contract_is_a_protocol_every_backend_implements():
    for name in dispatch.PRIORITY:
        loaded = dispatch.backend(name)
        if loaded.impl is not None:
            assert isinstance(loaded.impl, Backend) and loaded.impl.name == name


def test_a_backend_is_its_folder_plus_one_registry_line(toy_backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    with trace.capture() as calls:
        out = mfa_hf.flash_attn_func(q, k, v, causal=True, window_size=(3, -1))
        out.square().sum().backward()
    assert {key[:2] for key in calls} == {(NAME, "fwd"), (NAME, "bwd")}
    expected, _ = attention_reference(*(t.detach().double() for t in (q, k, v)), causal=True, window_size=(3, -1))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = attention_reference(*leaves, causal=True, window_size=(3, -1))
    ref.square().sum().backward()
    for mine, leaf in zip((q, k, v), leaves):
        torch.testing.assert_close(mine.grad.double(), leaf.grad, rtol=1e-4, atol=1e-5)
    compiled = torch.compile(lambda a, b, c: mfa_hf.flash_attn_func(a, b, c, causal=True), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), mfa_hf.flash_attn_func(q, k, v, causal=True))
    with pytest.raises(mfa_hf.BackendUnavailable, match=f"MFA_BACKEND={NAME} cannot serve this call: the toy"):
        mfa_hf.flash_attn_func(q, k, v, alibi_slopes=torch.ones(2))
