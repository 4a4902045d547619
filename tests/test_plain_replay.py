"""api.py's replay of repeated plain calls: when it is made, used, declined and never made.

A backend may offer a replay of a launch (kernels/contract.py `forward_replay`; the triton backend does, tested on
a GPU in tests/triton/test_replay.py). Here a stand-in replay on the torch backend records what api.py does with
it, so the rules hold on every machine: the second call of a kind makes it, later calls use it, a declined call
takes the full path, and a traced call, a dispatch mode, inputs that require grad and the native route never use
one. Every result is compared with the same call on an emptied memo.
"""

from __future__ import annotations

import pytest
import torch

import mfa_hf
from mfa_hf import api, dispatch, trace
from mfa_hf.kernels.contract import AttentionCall
from mfa_hf.testing_replay import ReplayCounter


def _stand_in(monkeypatch, shortcut, memo, log, decline, launch):
    """Give the torch backend's `shortcut` (ops.EagerShortcut) a stand-in replayer: each replay it makes logs
    ("made", q's shape), each call it serves ("used", q's shape) and computes launch(call, *tensors); it declines
    while `decline` is non-empty. `memo` (api's or the decode plan's) is emptied before and after."""
    monkeypatch.setenv("MFA_BACKEND", "torch")
    monkeypatch.delenv("MFA_TRACE", raising=False)

    def replayer(call):
        log.append(("made", tuple(call.q.shape)))

        def replay(*tensors):
            if decline:
                return None
            log.append(("used", tuple(tensors[0].shape)))
            return launch(call, *tensors)

        return replay

    monkeypatch.setattr(shortcut, "_replayer", replayer)
    memo.clear()


@pytest.fixture
def replays(monkeypatch):
    """The torch backend with a stand-in forward replay; returns (log, decline)."""
    backend, log, decline = dispatch.backend("torch"), [], []
    _stand_in(monkeypatch, backend.ops.forward, api._plain_decisions, log, decline,
              lambda call, q, k, v: backend.impl.forward(AttentionCall(q, k, v, call.options)))
    yield log, decline
    api._plain_decisions.clear()


def _qkv(seed, grad=False, shape=(2, 9, 4, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).requires_grad_(grad) for _ in range(3)]


def _fresh(q, k, v, **kwargs):
    saved = dict(api._plain_decisions)
    api._plain_decisions.clear()
    try:
        return mfa_hf.flash_attn_func(q, k, v, **kwargs)
    finally:
        api._plain_decisions.clear()
        api._plain_decisions.update(saved)


def _same(a, b):
    a, b = (x if isinstance(x, tuple) else (x,) for x in (a, b))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kwargs", [{}, {"causal": True, "return_lse": True}, {"window_size": (2, 1)}])
def test_the_second_call_makes_the_replay_and_later_calls_use_it(replays, kwargs):
    log, _ = replays
    results = [(qkv, mfa_hf.flash_attn_func(*qkv, **kwargs)) for qkv in map(_qkv, range(4))]
    assert log == [("made", (2, 9, 4, 16)), ("used", (2, 9, 4, 16)), ("used", (2, 9, 4, 16))]
    for qkv, result in results:
        _same(result, _fresh(*qkv, **kwargs))


def test_each_kind_has_its_own_replay(replays):
    log, _ = replays
    for shape in ((2, 9, 4, 16), (1, 5, 4, 16)):
        for seed in range(3):
            mfa_hf.flash_attn_func(*_qkv(seed, shape=shape))
    assert [entry for entry in log if entry[0] == "made"] == [("made", (2, 9, 4, 16)), ("made", (1, 5, 4, 16))]


def test_a_declined_call_takes_the_full_path_and_the_replay_stays(replays):
    log, decline = replays
    for seed in range(2):
        mfa_hf.flash_attn_func(*_qkv(seed))
    decline.append(True)
    qkv = _qkv(2)
    _same(mfa_hf.flash_attn_func(*qkv), _fresh(*qkv))
    decline.clear()
    mfa_hf.flash_attn_func(*_qkv(3))
    # the declined call made a new replay (the old one may be stale), which the next call used
    assert log == [("made", (2, 9, 4, 16)), ("made", (2, 9, 4, 16)), ("used", (2, 9, 4, 16))]


def test_traced_calls_are_counted_and_never_replayed(replays):
    log, _ = replays
    with trace.capture() as counted:
        for seed in range(3):
            mfa_hf.flash_attn_func(*_qkv(seed))
    assert sum(counted.values()) == 3 and not log
    mfa_hf.flash_attn_func(*_qkv(3))  # untraced again: the replay is made now
    with trace.capture() as counted:
        mfa_hf.flash_attn_func(*_qkv(4))
    assert sum(counted.values()) == 1 and log == [("made", (2, 9, 4, 16))]


def test_a_dispatch_mode_sees_the_op(replays):
    from torch.utils._python_dispatch import TorchDispatchMode

    log, _ = replays
    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    for seed in range(2):
        mfa_hf.flash_attn_func(*_qkv(seed))
    with Log():
        mfa_hf.flash_attn_func(*_qkv(2))
    assert any("torch_attention_fwd" in name for name in seen), seen
    assert ("used", (2, 9, 4, 16)) not in log


def test_inputs_that_require_grad_never_get_a_replay(replays):
    log, _ = replays
    for seed in range(3):
        q, k, v = _qkv(seed, grad=True)
        mfa_hf.flash_attn_func(q, k, v).sum().backward()
        assert q.grad is not None
    assert not log
    with torch.no_grad():  # the same tensors without a graph to record: another kind, which replays
        for seed in range(3):
            mfa_hf.flash_attn_func(*_qkv(seed, grad=True))
    assert log == [("made", (2, 9, 4, 16)), ("used", (2, 9, 4, 16))]


NATIVE_KINDS = {  # what the CPU route sends to SDPA: (q shape, KV heads, options)
    "square": ((2, 9, 4, 16), 4, {}),
    "square_causal": ((2, 9, 4, 16), 4, {"causal": True}),
    "one_row_gqa_causal": ((2, 1, 6, 16), 2, {"causal": True}),
    "one_row_left_window": ((1, 1, 4, 16), 4, {"window_size": (3, 0)}),
    "one_row_gqa_left_window": ((2, 1, 6, 16), 2, {"causal": True, "window_size": (5, 0)}),
}


@pytest.mark.parametrize("shape, heads_kv, kwargs", NATIVE_KINDS.values(), ids=NATIVE_KINDS.keys())
def test_the_native_route_replays_sdpa_with_the_kinds_route(replays, monkeypatch, shape, heads_kv, kwargs):
    """Routed to the platform's SDPA (CPU here), a kind's replay calls the same SDPA with the same route (causal
    flag, the one-row window's key slice, query groups as rows): bitwise the full path, gradients included."""
    log, _ = replays
    monkeypatch.delenv("MFA_BACKEND")
    batch, lq, heads, dim = shape

    def qkv(seed, grad=False):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(batch, lq, heads, dim, generator=g)
        keys = lq if lq > 1 else 11  # square where Lq > 1: SDPA's top-left causal is ours only there
        k, v = (torch.randn(batch, keys, heads_kv, dim, generator=g) for _ in range(2))
        return [t.requires_grad_(grad) for t in (q, k, v)]

    for grad in (False, True):
        api._plain_decisions.clear()
        for seed in range(4):
            tensors = qkv(seed, grad)
            out = mfa_hf.flash_attn_func(*tensors, **kwargs)
            fresh_tensors = qkv(seed, grad)
            fresh = _fresh(*fresh_tensors, **kwargs)
            assert torch.equal(out, fresh)
            if grad:
                weights = torch.randn_like(out)
                for ours, theirs in zip(torch.autograd.grad((out * weights).sum(), tensors),
                                        torch.autograd.grad((fresh * weights).sum(), fresh_tensors)):
                    assert torch.equal(ours, theirs)
        (decision,) = api._plain_decisions.values()
        assert decision.backend is None, "expected CPU SDPA's native route here"
        assert decision.replay not in (None, api._NO_REPLAY)
    assert not log  # the torch backend's stand-in was never asked


def test_the_native_route_replay_is_used(replays, monkeypatch):
    monkeypatch.delenv("MFA_BACKEND")
    for seed in range(2):
        mfa_hf.flash_attn_func(*_qkv(seed))
    counter = ReplayCounter()
    for seed in range(2, 4):
        mfa_hf.flash_attn_func(*_qkv(seed))
    assert counter.served == 2 and counter.intact


# ----------------------------------------------------------------------------------------------
# The decode plan's layers (mfa_hf/decode_plan.py): the same rules for the backend's decode replay.

from mfa_hf import decode_plan  # noqa: E402
from mfa_hf.decode_plan import DecodePlan, LayerKV  # noqa: E402
from mfa_hf.kernels.contract import CacheSide, DecodeCall  # noqa: E402
from mfa_hf.testing_replay import decode_full_path  # noqa: E402


@pytest.fixture
def decode_replays(monkeypatch):
    """The torch backend with a stand-in decode replay; returns (log, decline), the log's entries "made"/"used"."""
    backend, log, decline = dispatch.backend("torch"), [], []
    _stand_in(monkeypatch, backend.ops.decode, decode_plan._decisions, log, decline,
              lambda call, q, keys, values, lengths: backend.impl.decode(
                  DecodeCall(q, keys, values, lengths, call.options, call.cache_batch_idx)))
    yield log, decline
    decode_plan._decisions.clear()


def _names(log) -> list:
    return [entry[0] for entry in log]


def _layer(seed, length=20, capacity=24, residual=False):
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(2, capacity, 2, 16, generator=g) for _ in range(2))
    extra = tuple(torch.randn(2, 3, 2, 16, generator=g) for _ in range(2)) if residual else None
    return (torch.randn(2, 1, 4, 16, generator=g),
            LayerKV(CacheSide(k, None, "none", 16), CacheSide(v, None, "none", 16), length, extra))


def _decode_fresh(plan, q, layer, **kwargs):
    return decode_full_path(plan, q, layer, **kwargs)


@pytest.mark.parametrize("kwargs", [{"scale": 0.25}, {"scale": 0.3, "window_left": 5, "softcap": 4.0}])
def test_decode_layers_replay_after_the_first(decode_replays, kwargs):
    log, _ = decode_replays
    plan = DecodePlan(2, 1)
    for seed in range(4):
        q, layer = _layer(seed)
        assert torch.equal(plan.run(q, layer, **kwargs), _decode_fresh(plan, q, layer, **kwargs))
    assert _names(log) == ["made", "used", "used", "used"]


def test_decode_kinds_that_cannot_replay(decode_replays):
    log, _ = decode_replays
    plan = DecodePlan(2, 1)
    for seed in range(3):
        q, layer = _layer(seed, residual=True)
        assert torch.equal(plan.run(q, layer, scale=0.25), _decode_fresh(plan, q, layer, scale=0.25))
        plan.run(q, _layer(seed)[1], scale=0.25, sinks=torch.zeros(4))
    with trace.capture() as counted:
        for seed in range(3):
            q, layer = _layer(seed, length=11)
            plan.run(q, layer, scale=0.25)
    assert not log and sum(counted.values()) == 3
    assert all(path.replay is decode_plan._NO_REPLAY for kind, path in decode_plan._decisions.items()
               if kind[-2] is not None or kind[-3] is not None)


def test_a_declined_decode_takes_the_full_path(decode_replays):
    log, decline = decode_replays
    plan = DecodePlan(2, 1)
    plan.run(*_layer(0), scale=0.25)
    decline.append(True)
    q, layer = _layer(1)
    assert torch.equal(plan.run(q, layer, scale=0.25), _decode_fresh(plan, q, layer, scale=0.25))
    decline.clear()
    plan.run(*_layer(2), scale=0.25)
    assert _names(log) == ["made", "made", "used"]  # the declined call made a new replay, which the next call used
