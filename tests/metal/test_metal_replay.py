"""The Metal forward's replay (kernels/metal/forward.py `replay`, api.py): a repeated plain flash_attn_func call
relaunches the library kernel with its plan, and gives bitwise what the full path gives. On a Mac's mps device,
and elsewhere through the MSL emulator.

The class of what a replay could get wrong is what its kind does not hold: each test makes a kind, lets it
replay, then calls it with fresh tensors that differ in one such property (the storage offset behind the
kernel's vector loads, the library cache, the emulated target) and compares with the full path and the float64
reference. Outputs are poisoned (NaN) first.
"""

from __future__ import annotations

import pytest
import torch

import mfa_hf
from mfa_hf import api
from mfa_hf.kernels import launch as kernel_launch
from mfa_hf.kernels.metal import loader
from mfa_hf.kernels.reference import attention_reference
from mfa_hf.testing import assert_close_to_reference
from mfa_hf.testing_replay import (DecodeReplayCounter, ReplayCounter, decode_full_path, full_path,
                                   kept_replays)

# (name, dtype, B, Lq, Lk, Hq, Hkv, D, keyword arguments of flash_attn_func)
KINDS = [
    ("plain", torch.float32, 2, 9, 13, 4, 2, 16, {}),
    ("causal_lse_fp16", torch.float16, 1, 12, 12, 2, 2, 32, {"causal": True, "return_lse": True}),
    ("window_softcap", torch.float32, 1, 10, 10, 4, 1, 16, {"window_size": (3, 1), "softcap": 4.0}),
]


@pytest.fixture
def replaying(metal_backend, monkeypatch):
    monkeypatch.delenv("MFA_TRACE", raising=False)
    monkeypatch.setattr(kernel_launch, "POISON_OUTPUTS", True)
    api._plain_decisions.clear()
    yield metal_backend
    api._plain_decisions.clear()


def _qkv(kind, seed, device, layout="bshd", offset=0):
    _, dtype, batch, lq, lk, hq, hkv, d, _ = kind
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for shape in ((batch, lq, hq, d), (batch, lk, hkv, d), (batch, lk, hkv, d)):
        values = torch.randn(*shape, generator=g).to(dtype)
        if layout == "bhsd":
            values = values.transpose(1, 2).contiguous().transpose(1, 2)
        tensors.append(values.to(device))
    if offset:  # the same shape and strides, q `offset` elements into a larger buffer
        buffer = torch.zeros(tensors[0].numel() + offset, dtype=dtype, device=device)
        shifted = buffer[offset:].view(tensors[0].shape)
        shifted.copy_(tensors[0])
        tensors[0] = shifted
    return tensors


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def _call(kind, q, k, v):
    with torch.no_grad():
        return mfa_hf.flash_attn_func(q, k, v, **kind[-1])


def _check(kind, q, k, v, result):
    for x, y in zip(_outputs(result), _outputs(full_path(lambda: _call(kind, q, k, v)))):
        assert not x.isnan().any() and torch.equal(x, y), f"{kind[0]}: differs from the full path"
    options = {n: value for n, value in kind[-1].items() if n != "return_lse"}
    cpu = [t.cpu() for t in (q, k, v)]
    expected, _ = attention_reference(*cpu, **options)
    baseline, _ = attention_reference(*cpu, upcast=False, **options)
    assert_close_to_reference(_outputs(result)[0].cpu(), expected, baseline)


def _with_replay(kind, device):
    for seed in range(2):  # the first call decides, the second makes the replay
        _call(kind, *_qkv(kind, seed, device))
    return ReplayCounter()


@pytest.mark.parametrize("kind", KINDS, ids=[k[0] for k in KINDS])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_replayed_calls_equal_the_full_path(kind, layout, replaying):
    for seed in range(2):
        _call(kind, *_qkv(kind, seed, replaying.device, layout))
    counter = ReplayCounter()
    for seed in (2, 3):
        q, k, v = _qkv(kind, seed, replaying.device, layout)
        result = _call(kind, q, k, v)
        assert counter.served == seed - 1 and counter.intact, "the replay was not used, or declined"
        _check(kind, q, k, v, result)


def test_a_storage_offset_changes_the_vector_rows_bits(replaying):
    """The kernel reads q rows with vector loads only where the storage offset allows: the replay reads the offset
    on every call, as the full path does."""
    kind = KINDS[0]
    counter = _with_replay(kind, replaying.device)
    q, k, v = _qkv(kind, 4, replaying.device, offset=1)
    _check(kind, q, k, v, _call(kind, q, k, v))
    assert counter.served == 1 and counter.intact


def test_a_swapped_library_cache_takes_the_full_path(replaying, monkeypatch):
    kind = KINDS[0]
    counter = _with_replay(kind, replaying.device)
    monkeypatch.setattr(loader, "_libraries", {})
    q, k, v = _qkv(kind, 5, replaying.device)
    _check(kind, q, k, v, _call(kind, q, k, v))
    assert counter.served == 0 and not counter.intact and len(kept_replays()) == 1


def test_another_emulated_target_takes_the_full_path(replaying):
    if not replaying.is_emulated:
        pytest.skip("the emulated target exists only under the emulator")
    from mfa_hf.kernels.metal.emulator.targets import emulate

    kind = KINDS[0]
    counter = _with_replay(kind, replaying.device)
    with emulate(macos="14"):
        q, k, v = _qkv(kind, 6, replaying.device)
        result = _call(kind, q, k, v)
        assert counter.served == 0, "a replay made for another target was used"
        _check(kind, q, k, v, result)


# ----------------------------------------------------------------------------------------------
# The decode plan's layers (mfa_hf/decode_plan.py): the Metal decode replay (kernels/metal/decode.py `replay`).

from mfa_hf import decode_plan, trace  # noqa: E402
from mfa_hf.decode_plan import DecodePlan, LayerKV  # noqa: E402
from mfa_hf.kernels.contract import CacheSide  # noqa: E402
from mfa_hf.kvcache import cache_side  # noqa: E402
from mfa_hf.quant import quantize_kv  # noqa: E402

# (name, format, dtype, capacity, valid length, Hq, Hkv, D, layout)
DECODE_KINDS = [
    ("fp32", None, torch.float32, 40, 33, 4, 2, 16, "bshd"),
    ("fp16_hf_layout", None, torch.float16, 300, 290, 4, 1, 32, "bhsd"),
    ("int8", "int8", torch.float32, 64, 50, 4, 2, 32, "bshd"),
    ("nf4", "nf4", torch.float16, 64, 64, 2, 2, 64, "bshd"),
]


@pytest.fixture
def decode_replaying(replaying):
    decode_plan._decisions.clear()
    yield replaying
    decode_plan._decisions.clear()


def _decode_layer(kind, seed, device):
    _, fmt, dtype, capacity, length, hq, hkv, d, layout = kind
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 1, hq, d, generator=g).to(dtype).to(device)
    sides = []
    for _ in range(2):
        values = torch.randn(2, capacity, hkv, d, generator=g).to(dtype)
        if layout == "bhsd":  # transformers' cache layout (B, Hkv, S, D), read as a (B, S, Hkv, D) view
            values = values.transpose(1, 2).contiguous().transpose(1, 2)
        values = values.to(device)
        sides.append(CacheSide(values, None, "none", d) if fmt is None else cache_side(quantize_kv(values, fmt)))
    return q, LayerKV(sides[0], sides[1], length)


def _decode_full_path(plan, q, layer, **options):
    return decode_full_path(plan, q, layer, **options)


@pytest.mark.parametrize("kind", DECODE_KINDS, ids=[k[0] for k in DECODE_KINDS])
@pytest.mark.parametrize("options", [{"scale": 0.2}, {"scale": 0.25, "window_left": 20, "softcap": 3.0}],
                         ids=["plain", "window_softcap"])
def test_decode_replays_equal_the_full_path(kind, options, decode_replaying):
    device, plan = decode_replaying.device, DecodePlan(2, 1)
    with torch.no_grad():
        plan.run(*_decode_layer(kind, 0, device), **options)
        counter = DecodeReplayCounter()
        for seed in (1, 2):
            q, layer = _decode_layer(kind, seed, device)
            replayed = plan.run(q, layer, **options)
            assert counter.served == seed and counter.intact, "the replay was not used, or declined"
            assert not replayed.isnan().any()
            assert torch.equal(replayed, _decode_full_path(plan, q, layer, **options)), f"{kind[0]} seed {seed}"


def test_a_decode_replay_declines_another_layout(decode_replaying):
    kind, device, plan = DECODE_KINDS[0], decode_replaying.device, DecodePlan(2, 1)
    with torch.no_grad():
        plan.run(*_decode_layer(kind, 0, device), scale=0.2)
        (path,) = [p for p in decode_plan._decisions.values() if p.replay not in (None, decode_plan._NO_REPLAY)]
        q, layer = _decode_layer(kind, 1, device)
        lengths = torch.full((2,), 33, dtype=torch.int32, device=device)
        strided_q = torch.zeros(2, 1, 8, 16, dtype=q.dtype, device=device)[:, :, :4]  # q's head stride differs
        strided_q.copy_(q)
        wide = torch.zeros(2, 40, 2, 32, dtype=layer.keys.codes.dtype, device=device)[..., :16]
        wide.copy_(layer.keys.codes)  # same shape and values, another row stride
        assert path.replay(q, CacheSide(wide, None, "none", 16), layer.values, lengths) is None
        assert path.replay(q, layer.keys, layer.values, lengths.long()) is None
        assert path.replay(strided_q, layer.keys, layer.values, lengths) is None
        assert path.replay(q, layer.keys, layer.values, lengths) is not None  # the kind's own layout replays
