"""The CPU one-row decode over int8 / fp8 codes with their scales applied after the products
(kernels/torch/cpu_scaled_codes.py) against the float64 reference.

Every case checks that this path served (or, for per-channel scales, that it did not), over formats, dtypes,
GQA/MQA/MHA, odd head dims, windows, sinks, lengths that are no multiple of the chunk (a tiny WIDE_BYTES cuts
the keys into many chunks), per-token and per-head scales, unusual strides of every tensor argument, and a NaN
code (it must reach only the query heads of its KV head). Outputs and the widening buffer start as NaN
(tests/conftest.py), so an element read before it is written fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

import mfa_hf
from mfa_hf.kernels.torch import cpu_scaled_codes
from mfa_hf.testing_kvcache import (
    BATCH,
    DecodeCase,
    assert_matches_reference_over_cache,
    assert_path_switch_agrees,
    assert_served_and_matches_reference,
    make_decode_inputs,
    record_calls,
    run_kvcache,
    run_with_odd_layouts,
)

CAPACITY = 80
FORMATS = ("int8", "fp8_e4m3", "fp8_e5m2", "nf4")


@pytest.fixture
def served(monkeypatch):
    """Counts the calls this path computed (the (start, length) of each)."""
    return record_calls(monkeypatch, cpu_scaled_codes, "parts", lambda call, start, length: (start, length))


def _cases():
    windows = ((-1, -1), (9, -1), (0, -1), (200, 3))
    heads = ((4, 2), (4, 1), (3, 3), (8, 2))
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    cases = []
    for n, fmt in enumerate(FORMATS):
        # nf4's head dims are multiples of its groups: 96 and 128 hold several groups of 32 and 64 per key
        dims = (64, 96, 128) if fmt == "nf4" else (64, 40, 72)
        for m in range(4):
            i = n + m
            cases.append(DecodeCase(fmt, 1, dtypes[i % 3], heads[i % 4], dim=dims[i % 3], window=windows[m],
                                    sinks=bool(i % 2)))
    cases.append(DecodeCase("int8", 1, torch.float32, (4, 2), v_format="fp8_e5m2", sinks=True))
    cases.append(DecodeCase("nf4", 1, torch.float32, (6, 2), dim=96, v_format="int8", sinks=True))
    cases.append(DecodeCase("fp8_e4m3", 1, torch.bfloat16, (6, 3), dim=128, v_format="nf4", window=(20, -1)))
    return cases


@pytest.mark.parametrize("wide_bytes", [cpu_scaled_codes.WIDE_BYTES, 5000], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.id)
def test_matches_reference(case, wide_bytes, served, monkeypatch):
    monkeypatch.setattr(cpu_scaled_codes, "WIDE_BYTES", wide_bytes)
    assert_served_and_matches_reference(case, CAPACITY, lambda: served[-1][1] if served else None,
                                        "scaled-codes path", seed=7)


def test_equals_the_fused_kernel_chunks(monkeypatch):
    """Same inputs through this path and through dequantize + torch's fused kernel agree to fp32 rounding."""
    case = DecodeCase("int8", 1, torch.float32, (8, 2), window=(30, -1), sinks=True)
    assert_path_switch_agrees(lambda enabled: monkeypatch.setattr(cpu_scaled_codes, "ENABLED", enabled), case,
                              length=63, capacity=CAPACITY)


@pytest.mark.parametrize("granularity,serves", [("head", True), ("channel", False)])
@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_static_scales(fmt, granularity, serves, served):
    """Per-head scales factor out like per-token ones; per-channel ones do not (the fused-kernel chunks serve)."""
    g = torch.Generator().manual_seed(3)
    case = DecodeCase(fmt, 1, torch.float32, (6, 2), sinks=True)
    inputs = make_decode_inputs(case, (50,) * BATCH, CAPACITY, seed=11)
    for name in ("k_cache", "v_cache"):
        content = torch.randn(BATCH, CAPACITY, 2, 64, generator=g)
        inputs[name] = mfa_hf.quantize_kv(content, fmt, granularity=granularity)
    out, lse = run_kvcache(case, inputs)
    assert bool(served) == serves
    assert_matches_reference_over_cache(case, inputs, out, lse)


@pytest.mark.parametrize("k_group,v_group", [(32, 64), (64, 32), (32, 32)])
def test_groups_of_either_side(k_group, v_group, served):
    """nf4 keys and values with their own group sizes (one or two groups a key at D 64) against the reference."""
    g = torch.Generator().manual_seed(5)
    case = DecodeCase("nf4", 1, torch.float32, (6, 2), sinks=True, window=(33, -1))
    inputs = make_decode_inputs(case, (70,) * BATCH, CAPACITY, seed=13)
    for name, group in (("k_cache", k_group), ("v_cache", v_group)):
        content = torch.randn(BATCH, CAPACITY, 2, 64, generator=g) * torch.rand(1, 1, 1, 64, generator=g) * 4
        inputs[name] = mfa_hf.quantize_kv(content, "nf4", group_size=group)
    out, lse = run_kvcache(case, inputs)
    assert served
    assert_matches_reference_over_cache(case, inputs, out, lse)


@pytest.mark.parametrize("codes_layout", ["heads", "offset", "expanded-keys", "expanded-last"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_unusual_strides_of_every_argument(fmt, codes_layout, served):
    case = DecodeCase(fmt, 1, torch.float32, (8, 2), window=(40, -1), sinks=True)
    out, lse, reference_inputs = run_with_odd_layouts(case, codes_layout, CAPACITY, 57, seed=2)
    assert served
    assert_matches_reference_over_cache(case, reference_inputs, out, lse)


def test_a_nan_code_reaches_only_its_heads(served):
    """A NaN key (an fp8 NaN byte) makes the rows of the query heads of its KV head NaN, and no others."""
    case = DecodeCase("fp8_e4m3", 1, torch.float32, (4, 2))
    inputs = make_decode_inputs(case, (30,) * BATCH, CAPACITY)
    inputs["k_cache"].codes[2, 7, 1, 3] = 0x7F  # e4m3fn's NaN
    out, _ = run_kvcache(case, inputs)
    assert served
    assert bool(out[2, 0, 2:4].isnan().all()) and bool(torch.isfinite(out[2, 0, :2]).all())
    assert bool(torch.isfinite(out[:2]).all())
