"""The metal decode kernels (vector, split-K + merge) over plain and quantized KV caches, against
the float64 reference on the dequantized cache (DESIGN.md rule), every case under two schedules
with bitwise-equal outputs and NaN-poisoned outputs (tests/conftest.py).

Also: every one of the 256 codes of each byte format decoded by the kernel's dequant.h equals
torch's own conversion.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import mfa_hf
from mfa_hf import trace
from mfa_hf.kernels.metal import decode as metal_decode
from mfa_hf.kernels.metal.loader import kernel_source
from mfa_hf.quant import NF4_LEVELS
from mfa_hf.testing_kvcache import (
    BATCH,
    CACHE_ROWS,
    FORMATS,
    DecodeCase,
    assert_matches_reference_over_cache,
    caches_on,
    make_decode_inputs,
    run_kvcache,
)

from .conftest import bits

CAPACITY = 80
LENGTHS = (0, 29, 70)  # before the append: ragged, one empty


def decode_cases() -> list[DecodeCase]:
    """Every format x q_len (1, 4), features rotated; splits 1 (vector), forced and odd."""
    features = ({}, {"softcap": 4.0, "num_splits": 3}, {"sinks": True, "batch_idx": True}, {"window": (9, -1)},
                {"alibi": True, "num_splits": 4}, {"causal": False, "window": (6, 3), "sinks": True, "num_splits": 2},
                {"batch_idx": True, "softcap": 3.0, "alibi": True, "num_splits": 5, "sinks": True},
                {"causal": False}, {"sinks": True, "num_splits": 7}, {"alibi": True, "window": (12, -1)})
    heads = ((4, 2), (4, 1), (3, 3), (8, 1))
    dims = (64, 32, 128, 64)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    cases = []
    for n, (fmt, lq) in enumerate(itertools.product(FORMATS, (1, 4))):
        cases.append(DecodeCase(fmt, lq, dtypes[n % 3], heads[n % 4], dims[n % 4], **features[n % len(features)]))
    return cases


def make_inputs(case: DecodeCase, seed: int = 0) -> dict:
    return make_decode_inputs(case, LENGTHS, CAPACITY, seed)


def check_decode(case: DecodeCase, runtime, two_schedules, seed: int = 0):
    inputs = caches_on(make_inputs(case, seed), runtime.device)
    with trace.capture() as calls:
        out, lse = run_kvcache(case, inputs, runtime.device)
    assert trace.served_by(calls)[("metal", "decode")] == 1, dict(trace.served_by(calls))
    if inputs["k"] is not None and inputs["k"].shape[1]:  # new tokens: quantized on write by the metal kernel
        assert trace.served_by(calls)[("metal", "append")] == 2, dict(trace.served_by(calls))
    # The same call again (same positions, same tokens): the append rewrites identical codes.
    two_schedules.again(lambda: run_kvcache(case, inputs, runtime.device), (out, lse))
    assert_matches_reference_over_cache(case, inputs, out, lse)


@pytest.mark.parametrize("case", decode_cases(), ids=lambda c: c.id)
def test_decode_matches_reference(case, metal_backend, two_schedules):
    check_decode(case, metal_backend, two_schedules)


@pytest.mark.parametrize("case", [
    DecodeCase("fp8_e4m3", 1, torch.float16, (4, 2), 64, v_format="int8", num_splits=3),
    DecodeCase("nf4", 4, torch.bfloat16, (2, 1), 256, sinks=True),
    DecodeCase("int8", 1, torch.float32, (2, 2), 160, alibi=True, num_splits=2),
    DecodeCase(None, 9, torch.float32, (6, 2), 40, window=(5, 2), causal=False, sinks=True),
    DecodeCase("fp8_e5m2", 3, torch.float32, (16, 2), 96, softcap=2.0, num_splits=4),
], ids=lambda c: c.id)
def test_decode_shapes(case, metal_backend, two_schedules):
    """Mixed K/V formats, head dims beyond 128 (4-row tiles), q_len > 8 (several row tiles),
    D not a multiple of 32 (idle lanes), G * Lq beyond one tile."""
    check_decode(case, metal_backend, two_schedules)


@pytest.mark.parametrize("case", [
    DecodeCase(None, 1, torch.float32, (4, 2), 33, num_splits=2),
    DecodeCase("int8", 1, torch.float16, (4, 1), 1, num_splits=3),
    DecodeCase("fp8_e4m3", 4, torch.bfloat16, (3, 3), 65, num_splits=7, sinks=True),
    DecodeCase("int8", 1, torch.float32, (4, 2), 40, num_splits=9, window=(20, -1)),  # nf4: D a multiple of 32
    DecodeCase("fp8_e5m2", 1, torch.float16, (2, 2), 97, num_splits=2, v_format="int8"),
    DecodeCase(None, 3, torch.bfloat16, (8, 2), 129, num_splits=4, softcap=3.0),
], ids=lambda c: c.id)
def test_split_merge_at_head_dims_off_a_multiple_of_32(case, metal_backend, two_schedules):
    """The merge's last column pass runs on D % 32 lanes: it took other splits' weights from lanes that were not
    there (wrong outputs, 0.18 to 1.9 off, at D = 1, 33, 65, 97, 129; session 27's layout fuzz). The emulator now
    refuses such a read (tests/emulator/test_simd.py)."""
    check_decode(case, metal_backend, two_schedules)


def test_splits_come_from_the_shape_and_agree(metal_backend, two_schedules, monkeypatch):
    """Auto splits: one pass for short caches, several for long ones (from the capacity, not the
    lengths); a long cache gives the same answer with the auto choice and with one split."""
    splits = metal_decode.SPLITS
    assert splits.splits(work=2, key_span=200) == 1
    assert splits.splits(work=2, key_span=4096) == 16
    assert splits.splits(work=256, key_span=4096) == 1
    assert splits.splits(work=2, key_span=4096, requested=200) == splits.max_splits
    # so that a small cache splits by itself
    monkeypatch.setattr(metal_decode, "SPLITS", dataclasses.replace(splits, min_keys=16))
    assert metal_decode.SPLITS.splits(work=6, key_span=CAPACITY) == 5
    case = DecodeCase("int8", 1, torch.float32, (4, 2), 32, sinks=True)
    check_decode(case, metal_backend, two_schedules)


def test_single_pass_and_split_agree_bitwise_on_empty_rows(metal_backend):
    """A sequence with no key visible: 0 and LSE -inf (or the sink) on both paths."""
    device = metal_backend.device
    q = torch.randn(2, 1, 2, 32).to(device)
    cache = torch.randn(2, 64, 1, 32).to(device)
    lengths = torch.tensor([0, 5], dtype=torch.int32).to(device)
    sinks = torch.tensor([0.5, -1.0]).to(device)
    for splits in (1, 3):
        out, lse = mfa_hf.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lengths, return_lse=True,
                                                  num_splits=splits)
        assert torch.equal(out[0].cpu(), torch.zeros(1, 2, 32)) and bool((lse[0].cpu() == float("-inf")).all())
        out, lse = mfa_hf.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lengths, return_lse=True,
                                                  num_splits=splits, sinks=sinks)
        assert torch.equal(out[0].cpu(), torch.zeros(1, 2, 32))
        assert torch.equal(lse[0, :, 0].cpu(), sinks.cpu())


def test_library_is_not_compiled_per_length(metal_backend):
    from mfa_hf.kernels.metal import loader

    before = {v for v in loader.cached_variants() if isinstance(v, metal_decode.DecodeVariant)}
    device = metal_backend.device
    q = torch.randn(1, 1, 2, 32).to(device)
    for capacity, length in ((40, 7), (50, 33), (64, 60)):
        cache = torch.randn(1, capacity, 2, 32).to(device)
        mfa_hf.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=torch.tensor([length], dtype=torch.int32).to(device))
    after = {v for v in loader.cached_variants() if isinstance(v, metal_decode.DecodeVariant)}
    assert len(after - before) <= 1, after - before


# ----------------------------------------------------------------------------------------------
# dequant.h on every code, against torch.

CODES_KERNEL = kernel_source("dequant.h") + """
kernel void decode_all(device const uchar* codes [[buffer(0)]], device float* out [[buffer(1)]],
                       uint i [[thread_position_in_grid]]) {
  device const char* signed_codes = (device const char*)codes;
  out[i] = fp8_e4m3_to_float(codes[i]);
  out[256 + i] = fp8_e5m2_to_float(codes[i]);
  out[512 + i] = code_value(signed_codes + i, 0, 1, FMT_INT8);
  out[768 + i] = code_value(codes + i / 2, int(i % 2), 1, FMT_NF4);  // byte i / 2, nibble i % 2
  out[1024 + i] = code_value(codes + i, 1, 1, FMT_NF4);  // element 1: the high nibble of byte i
}
"""


def test_every_code_decodes_like_torch(metal):
    codes = torch.arange(256, dtype=torch.uint8)
    out = torch.full((1280,), float("nan"))
    metal.compile_shader(CODES_KERNEL).decode_all(codes.to(metal.device), dev_out := out.to(metal.device),
                                                  threads=(256,), group_size=(256,))
    got = dev_out.cpu()
    e4m3 = codes.view(torch.float8_e4m3fn).float()
    e5m2 = codes.view(torch.float8_e5m2).float()
    assert _same_nan_bits(got[:256], e4m3), "fp8_e4m3"
    assert _same_nan_bits(got[256:512], e5m2), "fp8_e5m2"
    assert torch.equal(got[512:768], codes.view(torch.int8).float()), "int8"
    levels = torch.tensor(NF4_LEVELS)
    low_high = torch.stack((codes & 0xF, codes >> 4), -1).reshape(-1).long()
    assert torch.equal(got[768:1024], levels[low_high[:256]]), "nf4 low/high nibble order"
    assert torch.equal(got[1024:], levels[(codes >> 4).long()]), "nf4 high nibble"


def _same_nan_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits where b is a number (so +0/-0 and every finite value match exactly), NaN where b is NaN."""
    numbers = ~torch.isnan(b)
    return torch.equal(bits(a[numbers]), bits(b[numbers])) and bool(torch.isnan(a[~numbers]).all())


# ----------------------------------------------------------------------------------------------
# The quantize-on-write append kernel, bit-exact with mfa_hf.kvcache's torch append.

@pytest.mark.parametrize("fmt, granularity, dim, dtype", [
    (None, "token", 40, torch.bfloat16), ("fp8_e4m3", "token", 64, torch.float32),
    ("fp8_e5m2", "token", 48, torch.float16), ("int8", "token", 64, torch.bfloat16),
    ("int8", "channel", 32, torch.float32), ("fp8_e4m3", "head", 32, torch.float16),
    ("nf4", "token", 64, torch.float32), ("nf4", "token", 96, torch.bfloat16),
], ids=str)
def test_append_kernel_matches_the_torch_append(fmt, granularity, dim, dtype, metal):
    from mfa_hf import kvcache
    from mfa_hf.kernels.metal.append import append

    g = torch.Generator().manual_seed(9)
    content = torch.randn(CACHE_ROWS, 16, 2, dim, generator=g).to(dtype)
    new = (torch.randn(BATCH, 3, 2, dim, generator=g) * 3).to(dtype)
    new[0, 0, 0] = 0.0  # an all-zero token: scale 1, codes 0
    lengths = torch.tensor([0, 5, 13], dtype=torch.int32)
    rows = torch.tensor([4, 0, 2], dtype=torch.int32)

    def fresh():
        if fmt is None:
            return content.clone()
        group = 32 if fmt == "nf4" and dim % 64 else None
        return mfa_hf.quantize_kv(content, fmt, group_size=group, granularity=granularity)

    want, ours = fresh(), fresh()
    kvcache._append_all(want, want, new, new, lengths, rows)  # the torch path (both sides the same cache)
    if fmt is None:
        ours = ours.to(metal.device)
        append(ours, new.to(metal.device), lengths.to(metal.device), rows.to(metal.device))
        assert torch.equal(bits(ours.cpu()), bits(want))
        return
    on_device = mfa_hf.QuantizedKV(ours.codes.to(metal.device), ours.scales.to(metal.device), ours.format,
                                   ours.group_size, ours.dtype)
    append(on_device, new.to(metal.device), lengths.to(metal.device), rows.to(metal.device))
    assert torch.equal(on_device.codes.cpu(), want.codes), int((on_device.codes.cpu() != want.codes).sum())
    assert torch.equal(bits(on_device.scales.cpu()), bits(want.scales))


ENCODE_KERNEL = kernel_source("quantize.h") + """
kernel void encode_all(device const float* x [[buffer(0)]], device uchar* out [[buffer(1)]],
                       constant long& n [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  if (long(i) >= n) return;
  const Stored s = read_stored(x, i);
  out[i] = s.nan ? fp8_nan(s.negative) : fp8_from_float(clamp(x[i], -448.0f, 448.0f), 3, 7, -6);
  out[n + i] = s.nan ? fp8_nan(s.negative) : fp8_from_float(clamp(x[i], -57344.0f, 57344.0f), 2, 15, -14);
}
"""


def test_fp8_encoding_rounds_like_torch(metal):
    """Every finite value of both formats, every midpoint between neighbours (ties to even) and
    points just beside the midpoints: the kernel's bytes equal torch's conversion."""
    values = []
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        finite = torch.arange(256, dtype=torch.uint8).view(dtype).float()
        finite = finite[torch.isfinite(finite)].unique()
        mid = (finite[1:] + finite[:-1]) / 2
        values += [finite, mid, torch.nextafter(mid, torch.tensor(float("inf"))),
                   torch.nextafter(mid, torch.tensor(float("-inf")))]
    x = torch.cat(values + [torch.tensor([-0.0, 1e-12, -1e-12, 1e9, -1e9])])
    n = x.numel()
    out = torch.zeros(2 * n, dtype=torch.uint8).to(metal.device)
    metal.compile_shader(ENCODE_KERNEL).encode_all(x.to(metal.device), out, n, threads=(n,), group_size=(256,))
    want_e4m3 = x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    want_e5m2 = x.clamp(-57344, 57344).to(torch.float8_e5m2).view(torch.uint8)
    got = out.cpu()
    assert torch.equal(got[:n], want_e4m3), x[got[:n] != want_e4m3][:8]
    assert torch.equal(got[n:], want_e5m2), x[got[n:] != want_e5m2][:8]


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_quantized_cache_writes_through_the_metal_append_kernel(fmt, metal_backend):
    """MFAQuantizedCache stores new tokens through the serving backend's append (issue 18): on the metal
    backend that is its quantize-on-write kernel, and the codes equal mfa_hf.quantize_kv's."""
    from mfa_hf.integrations.transformers.quantized_cache import MFAQuantizedLayer

    g = torch.Generator().manual_seed(5)
    keys, values = (torch.randn(2, 2, 7, 64, generator=g) for _ in range(2))  # (B, Hkv, S, D)
    layer = MFAQuantizedLayer(fmt)
    with trace.capture() as calls:
        layer.update(keys[:, :, :5].to(metal_backend.device), values[:, :, :5].to(metal_backend.device))
        layer.update(keys[:, :, 5:].to(metal_backend.device), values[:, :, 5:].to(metal_backend.device))
    assert calls[("metal", "append", "float32", 64, 5, 256, f"kvcache kv={fmt}")] == 2  # K and V, prompt
    assert calls[("metal", "append", "float32", 64, 2, 256, f"kvcache kv={fmt}")] == 2  # K and V, next step
    for store, states in ((layer.k, keys), (layer.v, values)):
        expected = mfa_hf.quantize_kv(states, fmt, layout="bhsd").transpose(1, 2)
        assert store.length == 7
        assert torch.equal(store.buffer.codes[:, :7].cpu(), expected.codes)
        torch.testing.assert_close(store.buffer.scales[:, :7].cpu(), expected.scales, rtol=0, atol=0)
