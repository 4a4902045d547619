"""Unusual layouts reach the kernels' general-stride staging path and stay equal to the float64
reference; ordinary ones take the vector path (staging.h, binding.vector_rows). Each case records
the `vector_rows` flags the launcher computed, so a test cannot pass on the wrong path."""

import pytest
import torch

import math

from mfa_hf.kernels.contract import AttentionCall, Options
from mfa_hf.kernels.metal import binding, forward
from mfa_hf.kernels.reference import attention_reference
from mfa_hf.testing import assert_close_to_reference


def _layout(kind: str, shape, dtype, device, g) -> torch.Tensor:
    """A (B, S, H, D) tensor of the given layout kind (made in `dtype` on `device`, then viewed)."""
    b, s, h, d = shape
    full = {"contiguous": d, "dim_stride_2": 2 * d, "odd_offset": d + 1}[kind]
    t = torch.randn(b, s, h, full, generator=g).to(dtype).to(device)
    if kind == "dim_stride_2":  # head dim not unit-stride
        return t[..., ::2]
    if kind == "odd_offset":  # unit stride, rows not 4-element aligned
        return t[..., 1:]
    return t


@pytest.fixture
def recorded_bits(monkeypatch):
    seen = []

    launched = forward.vector_bits  # the flags the launcher passes (a plan's layout bits and the offsets)

    def record(layout_bits, *tensors):
        bits = launched(layout_bits, *tensors)
        assert bits == binding.vector_row_bits(*tensors)
        seen.append(bits)
        return bits

    monkeypatch.setattr(forward, "vector_bits", record)
    return seen


# Contiguous rows are aligned when D % 4 == 0 (D = 20: the last chunk is all padding, the vector
# path's scalar tail); D = 18 is contiguous but unaligned, so strided.
@pytest.mark.parametrize("kind", ["contiguous", "dim_stride_2", "odd_offset"])
@pytest.mark.parametrize("dtype, dim", [(torch.float16, 20), (torch.float16, 18), (torch.float32, 40),
                                        (torch.float16, 160)])
def test_forward_layouts(kind, dtype, dim, metal_backend, two_schedules, recorded_bits):
    vector = kind == "contiguous" and dim % 4 == 0
    g = torch.Generator().manual_seed(11)
    q, k, v = (_layout(kind, (1, n, 2, dim), dtype, metal_backend.device, g) for n in (21, 37, 37))
    options = Options(scale=1 / math.sqrt(dim), window_right=0)  # causal
    out, lse = two_schedules(lambda: forward.forward(AttentionCall(q, k, v, options)))  # the layout as given
    assert set(recorded_bits) == {7 if vector else 0}
    ref, ref_lse = attention_reference(*(t.cpu().double() for t in (q, k, v)), causal=True)
    base, base_lse = attention_reference(*(t.cpu() for t in (q, k, v)), causal=True, upcast=False)
    assert_close_to_reference(out.cpu(), ref, base)
    assert_close_to_reference(lse.cpu(), ref_lse, base_lse)


def _reference_with_grads(q, k, v, grad_out):
    """Float64 (out, dq, dk, dv) of causal attention, GQA by index."""
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    out, _ = attention_reference(q64, k64, v64, causal=True)
    out.backward(grad_out.cpu().double())
    return out.detach(), q64.grad, k64.grad, v64.grad


@pytest.mark.parametrize("kind", ["contiguous", "dim_stride_2", "odd_offset"])
def test_backward_layouts(kind, metal_backend):
    """The backward's loaders (load_lane with unit or general column strides, stepped row pointers)."""
    from mfa_hf.kernels.contract import Gradients
    from mfa_hf.kernels.metal import backward

    g = torch.Generator().manual_seed(12)
    dtype, device = torch.float32, metal_backend.device
    q, k, v = (_layout(kind, (1, n, h, 40), dtype, device, g) for n, h in ((19, 4), (29, 2), (29, 2)))
    grad_out = _layout(kind, (1, 19, 4, 40), dtype, device, g)
    call = AttentionCall(q, k, v, Options(scale=1 / math.sqrt(40), window_right=0))
    out, lse = forward.forward(call)
    dq, dk, dv, _, _ = backward.backward(call, Gradients(grad_out, None, out, lse))
    ref = _reference_with_grads(q, k, v, grad_out)
    for got, want in zip((out, dq, dk, dv), ref):
        assert (got.double() - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["contiguous", "dim_stride_2", "odd_offset"])
def test_decode_layouts(kind, metal_backend, two_schedules):
    """The decode's row loader (unit or general column strides, stepped row pointers) on a plain cache."""
    from mfa_hf.kernels.contract import CacheSide, DecodeCall
    from mfa_hf.kernels.metal import decode

    g = torch.Generator().manual_seed(13)
    dtype, device, dim = torch.float16, metal_backend.device, 48
    q = _layout(kind, (2, 1, 4, dim), dtype, device, g)
    k, v = (_layout(kind, (2, 50, 2, dim), dtype, device, g) for _ in range(2))
    seqlens = torch.tensor([50, 23], dtype=torch.int32, device=device)
    side = lambda t: CacheSide(t, None, "none", dim)  # noqa: E731
    call = DecodeCall(q, side(k), side(v), seqlens, Options(scale=1 / math.sqrt(dim)))
    out, _ = two_schedules(lambda: decode.decode(call))
    for b, n in enumerate((50, 23)):
        ref, _ = attention_reference(*(t[b:b + 1, :length].cpu().double() for t, length in ((q, 1), (k, n), (v, n))))
        assert (out[b:b + 1].cpu().double() - ref).abs().max().item() < 2e-3
