"""The triton forward's replay (kernels/triton/forward.py `replay`, api.py): a repeated plain flash_attn_func call
relaunches the kernel with no key, plan or launcher lookup, and gives bitwise what the full path gives.

The whole class of what a replay could get wrong is what its kind does not hold: each case below makes a kind,
lets it replay, then calls it with fresh tensors that differ in one such property (a 16-byte misaligned k, a
forgotten plan, a changed launch switch, a traced call, a dispatch mode, a thread without Triton's allocator)
and checks the result against the full path and the float64 reference. Outputs are poisoned (NaN) first.
CUDA only: the replay launches compiled kernels, which the interpreter has not.
"""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the replay launches CUDA kernels")

import mfa_hf  # noqa: E402
from mfa_hf import api, trace  # noqa: E402
from mfa_hf.kernels import launch as kernel_launch  # noqa: E402
from mfa_hf.kernels import reference  # noqa: E402
from mfa_hf.kernels.triton import forward as triton_forward  # noqa: E402
from mfa_hf.testing import assert_close_to_reference  # noqa: E402
from mfa_hf.testing_replay import (  # noqa: E402
    DecodeReplayCounter, ReplayCounter, decode_full_path, full_path, kept_replays)

# (name, dtype, B, Lq, Lk, Hq, Hkv, D, keyword arguments): the kinds, small and large N (TMA on sm90 at D 128).
KINDS = [
    ("plain", torch.float16, 2, 37, 53, 4, 2, 64, {}),
    ("causal_lse", torch.bfloat16, 1, 64, 64, 4, 4, 128, {"causal": True, "return_lse": True}),
    ("window_softcap", torch.float16, 2, 40, 40, 4, 1, 32, {"window_size": (9, 3), "softcap": 5.0}),
    ("scale_fp32", torch.float32, 1, 18, 45, 2, 1, 16, {"softmax_scale": 0.3}),
    ("large_tma", torch.bfloat16, 1, 1500, 1500, 2, 1, 128, {"causal": True}),
    ("large_d64", torch.float16, 1, 1300, 1400, 2, 2, 64, {}),
]


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setenv("MFA_BACKEND", "triton")
    monkeypatch.delenv("MFA_TRACE", raising=False)
    monkeypatch.setattr(kernel_launch, "POISON_OUTPUTS", True)
    api._plain_decisions.clear()
    yield
    api._plain_decisions.clear()


def _qkv(kind, seed, layout="bshd", offset=0):
    _, dtype, batch, lq, lk, hq, hkv, d, _ = kind
    g = torch.Generator().manual_seed(seed)
    shapes = ((batch, lq, hq, d), (batch, lk, hkv, d), (batch, lk, hkv, d))
    tensors = []
    for shape in shapes:
        values = torch.randn(*shape, generator=g).to(dtype)
        if layout == "bhsd":  # heads-first storage: other strides
            values = values.transpose(1, 2).contiguous().transpose(1, 2)
        tensors.append(values.cuda())
    if offset:  # the same shape and strides, k shifted by `offset` elements in a larger buffer
        k = tensors[1]
        buffer = torch.empty(k.numel() + offset, dtype=dtype, device="cuda")
        shifted = buffer[offset:].view(k.shape)
        shifted.copy_(k)
        tensors[1] = shifted
    return tensors


def _full_path(q, k, v, kwargs):
    return full_path(lambda: mfa_hf.flash_attn_func(q, k, v, **kwargs))


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def _assert_same(a, b, what):
    for x, y in zip(_outputs(a), _outputs(b)):
        assert not x.isnan().any(), f"{what}: NaN in the output (an element the kernel did not write)"
        assert torch.equal(x, y), f"{what}: differs from the full path"


def _check_reference(kind, q, k, v, result):
    options = {name: value for name, value in kind[-1].items() if name != "return_lse"}
    expected, _ = reference.attention_reference(q, k, v, **options)
    baseline, _ = reference.attention_reference(q, k, v, upcast=False, **options)
    assert_close_to_reference(_outputs(result)[0], expected, baseline)


@pytest.mark.parametrize("kind", KINDS, ids=[k[0] for k in KINDS])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_replayed_calls_equal_the_full_path(kind, layout):
    kwargs = kind[-1]
    with torch.no_grad():
        for seed in range(2):  # the first call decides, the second makes the replay
            mfa_hf.flash_attn_func(*_qkv(kind, seed, layout), **kwargs)
        counter = ReplayCounter()
        for seed in range(2, 4):
            q, k, v = _qkv(kind, seed, layout)
            replayed = mfa_hf.flash_attn_func(q, k, v, **kwargs)
            assert counter.served == seed - 1 and counter.intact, "the replay was not used, or declined"
            _assert_same(replayed, _full_path(q, k, v, kwargs), f"{kind[0]} seed {seed}")
            _check_reference(kind, q, k, v, replayed)


def _with_replay(kind):
    with torch.no_grad():
        for seed in range(2):
            mfa_hf.flash_attn_func(*_qkv(kind, seed), **kind[-1])
    (replay,) = kept_replays()
    return replay


def _declined(kind, q, k, v):
    """Whether the kept replay declines these tensors (and the call still gives the full path's result)."""
    (replay,) = kept_replays()
    declined = replay(q, k, v) is None
    with torch.no_grad():
        result = mfa_hf.flash_attn_func(q, k, v, **kind[-1])
    _assert_same(result, _full_path(q, k, v, kind[-1]), kind[0])
    return declined


@pytest.mark.parametrize("kind", [KINDS[0], KINDS[4]], ids=["plain", "large_tma"])
def test_a_misaligned_tensor_takes_the_full_path(kind):
    _with_replay(kind)
    q, k, v = _qkv(kind, 5, offset=1)  # same shape and strides, k 2 bytes off 16
    assert _declined(kind, q, k, v)
    _check_reference(kind, q, k, v, mfa_hf.flash_attn_func(q, k, v, **kind[-1]))


def test_forgotten_plans_and_changed_switches_take_the_full_path(monkeypatch):
    kind = KINDS[4]
    stale = _with_replay(kind)
    triton_forward.forget_plans()
    assert _declined(kind, *_qkv(kind, 6))
    (fresh,) = kept_replays()  # the declined call made a new replay, which serves the next calls
    assert fresh is not stale and fresh(*_qkv(kind, 7)) is not None
    api._plain_decisions.clear()
    _with_replay(kind)
    monkeypatch.setenv("MFA_TRITON_TMA", "0")
    assert _declined(kind, *_qkv(kind, 7))
    api._plain_decisions.clear()
    _with_replay(kind)
    monkeypatch.setenv("MFA_TRITON_DIRECT_LAUNCH", "0")
    assert _declined(kind, *_qkv(kind, 8))


def test_a_traced_call_is_counted_by_the_op():
    kind = KINDS[0]
    _with_replay(kind)
    with trace.capture() as counted, torch.no_grad():
        mfa_hf.flash_attn_func(*_qkv(kind, 9), **kind[-1])
    assert sum(counted.values()) == 1


def test_a_dispatch_mode_sees_the_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    kind = KINDS[0]
    _with_replay(kind)
    q, k, v = _qkv(kind, 10)
    with Log(), torch.no_grad():
        result = mfa_hf.flash_attn_func(q, k, v, **kind[-1])
    assert any("triton_attention_fwd" in name for name in seen), seen
    _assert_same(result, _full_path(q, k, v, kind[-1]), "under a dispatch mode")


def test_inputs_that_require_grad_get_no_replay():
    kind = KINDS[0]
    for seed in range(3):
        q, k, v = (t.requires_grad_() for t in _qkv(kind, seed))
        mfa_hf.flash_attn_func(q, k, v).sum().backward()
        assert q.grad is not None and not q.grad.isnan().any()
    assert not kept_replays()


def test_a_new_thread_without_an_allocator_is_served():
    kind = KINDS[4]
    _with_replay(kind)
    results, errors = [], []

    def worker():
        try:
            q, k, v = _qkv(kind, 11)
            with torch.no_grad():
                results.append((mfa_hf.flash_attn_func(q, k, v, **kind[-1]), _full_path(q, k, v, kind[-1])))
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert not errors, errors
    _assert_same(*results[0], "new thread")


def test_a_replayed_call_captures_in_a_cuda_graph():
    kind = KINDS[1]
    _with_replay(kind)
    static = _qkv(kind, 12)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        mfa_hf.flash_attn_func(*static, **kind[-1])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        captured = mfa_hf.flash_attn_func(*static, **kind[-1])
    for seed in (13, 14):
        for target, values in zip(static, _qkv(kind, seed)):
            target.copy_(values)
        graph.replay()
        _assert_same(captured, _full_path(*static, kind[-1]), f"graph replay {seed}")


# ----------------------------------------------------------------------------------------------
# The decode plan's layers (mfa_hf/decode_plan.py): the triton decode replay (kernels/triton/decode.py `replay`).

from mfa_hf import decode_plan  # noqa: E402
from mfa_hf.decode_plan import DecodePlan, LayerKV  # noqa: E402
from mfa_hf.kernels.contract import CacheSide  # noqa: E402
from mfa_hf.kvcache import cache_side  # noqa: E402
from mfa_hf.quant import quantize_kv  # noqa: E402

# (name, format, cache capacity, valid length, Hq, Hkv, D, layout): one split and split-K + merge.
DECODE_KINDS = [
    ("bf16_short", None, 96, 70, 8, 2, 128, "bshd"),
    ("bf16_long_hf_layout", None, 4096, 3000, 8, 2, 128, "bhsd"),
    ("int8", "int8", 2048, 1500, 8, 2, 64, "bshd"),
    ("fp8", "fp8_e4m3", 2048, 1900, 4, 4, 128, "bshd"),
    ("nf4", "nf4", 1024, 1000, 8, 1, 128, "bshd"),
]


@pytest.fixture
def empty_decisions():
    decode_plan._decisions.clear()
    yield
    decode_plan._decisions.clear()


def _decode_layer(kind, seed, offset=0):
    _, fmt, capacity, length, hq, hkv, d, layout = kind
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 1, hq, d, generator=g).to(torch.bfloat16).cuda()
    sides = []
    for _ in range(2):
        values = torch.randn(2, capacity, hkv, d, generator=g).to(torch.bfloat16).cuda()
        if layout == "bhsd":  # transformers' cache layout (B, Hkv, S, D), read as a (B, S, Hkv, D) view
            values = values.transpose(1, 2).contiguous().transpose(1, 2)
        if offset:
            buffer = torch.empty(values.numel() + offset, dtype=values.dtype, device="cuda")
            shifted = buffer[offset:].view(values.shape)
            shifted.copy_(values)
            values = shifted
        sides.append(CacheSide(values, None, "none", d) if fmt is None else cache_side(quantize_kv(values, fmt)))
    return q, LayerKV(sides[0], sides[1], length)


def _decode_full_path(plan, q, layer, **options):
    return decode_full_path(plan, q, layer, **options)


def _decode_replays():
    return [p.replay for p in decode_plan._decisions.values() if p.replay not in (None, decode_plan._NO_REPLAY)]


@pytest.mark.parametrize("kind", DECODE_KINDS, ids=[k[0] for k in DECODE_KINDS])
@pytest.mark.parametrize("options", [{"scale": 0.09}, {"scale": 0.1, "window_left": 300, "softcap": 20.0}],
                         ids=["plain", "window_softcap"])
def test_decode_replays_equal_the_full_path(kind, options, empty_decisions):
    plan = DecodePlan(2, 1)
    with torch.no_grad():
        plan.run(*_decode_layer(kind, 0), **options)
        counter = DecodeReplayCounter()
        for seed in (1, 2):
            q, layer = _decode_layer(kind, seed)
            replayed = plan.run(q, layer, **options)
            assert counter.served == seed and counter.intact, "the replay was not used, or declined"
            assert not replayed.isnan().any()
            assert torch.equal(replayed, _decode_full_path(plan, q, layer, **options)), f"{kind[0]} seed {seed}"


def test_a_misaligned_cache_takes_the_full_path(empty_decisions):
    kind, plan = DECODE_KINDS[0], DecodePlan(2, 1)
    with torch.no_grad():
        plan.run(*_decode_layer(kind, 0), scale=0.09)
        (replay,) = _decode_replays()
        q, layer = _decode_layer(kind, 3, offset=1)
        assert replay(q, layer.keys, layer.values, torch.full((2,), 70, dtype=torch.int32, device="cuda")) is None
        assert torch.equal(plan.run(q, layer, scale=0.09), _decode_full_path(plan, q, layer, scale=0.09))


def test_a_replayed_decode_step_captures_in_a_cuda_graph(empty_decisions):
    kind, plan = DECODE_KINDS[1], DecodePlan(2, 1)
    q, layer = _decode_layer(kind, 0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):  # decide, then make the replay (and the plan's length vector)
            plan.run(q, layer, scale=0.09)
    torch.cuda.current_stream().wait_stream(stream)
    assert len(_decode_replays()) == 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        captured = plan.run(q, layer, scale=0.09)
    for seed in (4, 5):
        new_q, new_layer = _decode_layer(kind, seed)
        q.copy_(new_q)
        layer.keys.codes.copy_(new_layer.keys.codes)
        layer.values.codes.copy_(new_layer.values.codes)
        graph.replay()
        assert torch.equal(captured, _decode_full_path(plan, q, layer, scale=0.09)), f"graph replay {seed}"
