"""Repeated plain calls skip the checks and the choice (mfa_hf/repeat_calls.py, api.py), and nothing else.

The memo key must hold everything the checks, the route and the backend choice read. The test for
that whole class: a sequence of calls that each change one ingredient of the key (dtype, shape, strides,
GQA, grad, options, steering environment), each run twice (the second from the memo), and every result
equal to the same call made with the memo emptied first; plus the paths that must never use the memo.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mfa_hf
from mfa_hf import api, decisions, dispatch, repeat_calls, trace


@pytest.fixture(autouse=True)
def empty_memo(monkeypatch):
    monkeypatch.delenv("MFA_BACKEND", raising=False)
    monkeypatch.setenv("MFA_ROUTE_TABLE", "")
    api._plain_decisions.clear()
    yield
    api._plain_decisions.clear()


@pytest.fixture
def decided(monkeypatch):
    """Counts the full decisions (checks + route + backend choice)."""
    calls = []
    full = api._decide

    def counting(call, return_lse):
        calls.append(call.q.shape)
        return full(call, return_lse)

    monkeypatch.setattr(api, "_decide", counting)
    return calls


def _qkv(shape=(2, 24, 4, 32), heads_kv=4, dtype=torch.float32, seed=0, grad=False, layout="bshd"):
    g = torch.Generator().manual_seed(seed)
    b, s, h, d = shape
    tensors = [torch.randn(b, s, h, d, generator=g), torch.randn(b, s + 5, heads_kv, d, generator=g),
               torch.randn(b, s + 5, heads_kv, d, generator=g)]
    if layout == "bhsd":  # same values, heads-first storage: other strides
        tensors = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in tensors]
    return [t.to(dtype).requires_grad_(grad) for t in tensors]


VARIANTS = {
    "base": ({}, {}),
    "bf16": ({"dtype": torch.bfloat16}, {}),
    "other-length": ({"shape": (2, 17, 4, 32)}, {}),
    "strides": ({"layout": "bhsd"}, {}),
    "gqa": ({"heads_kv": 2}, {}),
    "grad": ({"grad": True}, {}),
    "causal": ({}, {"causal": True}),
    "window": ({}, {"window_size": (3, 0)}),
    "scale": ({}, {"softmax_scale": 0.3}),
    "softcap": ({}, {"softcap": 5.0}),
    "lse": ({}, {"return_lse": True}),
}


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def test_each_ingredient_of_the_key_gets_its_own_decision(decided):
    for name, (tensor_options, call_options) in VARIANTS.items():
        q, k, v = _qkv(**tensor_options)
        first = mfa_hf.flash_attn_func(q, k, v, **call_options)
        count = len(decided)
        again = mfa_hf.flash_attn_func(q, k, v, **call_options)
        assert len(decided) == count, f"{name}: the repeated call was decided again"
        api._plain_decisions.clear()
        fresh = mfa_hf.flash_attn_func(q, k, v, **call_options)
        for a, b, c in zip(_outputs(first), _outputs(again), _outputs(fresh)):
            assert torch.equal(a, b) and torch.equal(a, c), name
    assert len(decided) == 2 * len(VARIANTS)


def test_the_steering_environment_is_part_of_the_key(monkeypatch, decided):
    q, k, v = _qkv()
    with trace.capture_routes() as routes_seen:
        mfa_hf.flash_attn_func(q, k, v)
        monkeypatch.setenv("MFA_BACKEND", "torch")
        mfa_hf.flash_attn_func(q, k, v)
        monkeypatch.setenv("MFA_BACKEND", "native")
        mfa_hf.flash_attn_func(q, k, v)
    assert len(decided) == 3
    assert {path for path, _ in routes_seen} == {"sdpa-cpu-flash", "ours"}


def test_a_memo_hit_is_still_traced(decided):
    q, k, v = _qkv()
    mfa_hf.flash_attn_func(q, k, v)
    with trace.capture_routes() as routes_seen, trace.capture() as calls:
        mfa_hf.flash_attn_func(q, k, v)
    assert len(decided) == 1 and sum(routes_seen.values()) == 1 and calls


def test_a_wrong_call_after_a_good_one_still_raises():
    q, k, v = _qkv()
    mfa_hf.flash_attn_func(q, k, v)
    with pytest.raises(TypeError, match="k: expected dtype"):
        mfa_hf.flash_attn_func(q, k.double(), v)
    with pytest.raises(ValueError, match="window_size"):
        mfa_hf.flash_attn_func(q, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match="dropout_p"):
        mfa_hf.flash_attn_func(q, k, v, dropout_p=1.5)


@pytest.mark.parametrize("options", [
    {"causal": np.bool_(True)}, {"causal": torch.tensor(True)}, {"softmax_scale": np.float32(0.2)},
    {"window_size": [3, 0]}, {"window_size": (np.int64(3), 0)}, {"softcap": torch.tensor(2.0)},
    {"dropout_p": 0.1, "dropout_seed": 3}, {"dropout_p": 0.1}, {"sinks": torch.zeros(4)},
    {"attn_mask": torch.ones(1, 1, 24, 29, dtype=torch.bool)}, {"causal": 1},
], ids=lambda o: "-".join(f"{k}={type(v).__name__}" for k, v in o.items()))
def test_other_argument_kinds_take_the_full_path(options, decided):
    """Tensors, numpy scalars, lists, ints for bools, dropout and helper tensors: checked every call."""
    q, k, v = _qkv()
    for _ in range(2):
        try:
            mfa_hf.flash_attn_func(q, k, v, **options)
        except (TypeError, ValueError):  # a refused kind (e.g. causal=1) is refused every time
            pass
    assert not api._plain_decisions and not decided or len(decided) == 2


def test_tensor_subclasses_and_compiled_graphs_take_the_full_path(decided):
    q, k, v = _qkv()
    parameter = torch.nn.Parameter(q.clone())
    assert repeat_calls.plain_kind(parameter, k, v, 0.0, None, False, (-1, -1), 0.0, False) is None
    compiled = torch.compile(lambda q, k, v: mfa_hf.flash_attn_func(q, k, v, causal=True), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), mfa_hf.flash_attn_func(q, k, v, causal=True))


def test_the_memo_is_bounded(monkeypatch):
    monkeypatch.setattr(decisions, "KEPT", 4)
    for length in range(3, 13):
        q, k, v = _qkv(shape=(1, length, 2, 8), heads_kv=2)
        mfa_hf.flash_attn_func(q, k, v)
        assert len(api._plain_decisions) <= 4


def test_grad_on_a_memo_hit_reaches_the_inputs():
    q, k, v = _qkv(grad=True)
    for _ in range(2):
        out = mfa_hf.flash_attn_func(q, k, v, causal=True)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    with torch.no_grad():
        assert not mfa_hf.flash_attn_func(q, k, v, causal=True).requires_grad


def test_forced_native_refusal_is_not_remembered_as_a_decision(monkeypatch):
    monkeypatch.setenv("MFA_BACKEND", "native")
    q, k, v = _qkv()
    for _ in range(2):
        with pytest.raises(dispatch.routes.NativeUnavailable):
            mfa_hf.flash_attn_func(q, k, v, softcap=3.0)
    assert not api._plain_decisions
