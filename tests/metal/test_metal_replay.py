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
from mfa_hf.testing_replay import ReplayCounter, full_path, kept_replays

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
