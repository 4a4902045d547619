"""The metal backward kernels (preprocess, dQ, dK/dV) against the float64 reference's gradients
(DESIGN.md rule, factor 3, FA2's delta-rounding allowance), gradients NaN-poisoned before each run
(tests/conftest.py), and the same gradients bitwise under a second emulator schedule."""

import pytest
import torch

import mfa_hf
from mfa_hf import trace
from mfa_hf.kernels.metal import backward as metal_backward
from mfa_hf.kernels.reference import attention_reference
from mfa_hf.testing import (
    GRADIENT_FACTOR,
    Case,
    assert_close_to_reference,
    check_against_reference,
    core_cases,
    differentiable,
    functorch_vjp,
    make_inputs,
    run_public_api,
)


def gradients(case: Case, inputs: dict, seed: int = 1):
    """out, lse and every input gradient of one run through the public API."""
    out, lse = run_public_api(case, inputs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype).to(out.device)
    names = differentiable(inputs)
    return (out, lse, *torch.autograd.grad(out, [inputs[n] for n in names], grad))


def check_backward(case: Case, runtime, two_schedules, seed: int = 0):
    """Gradients vs the reference (served by the metal backward), then bitwise under sg-random."""
    calls_seen = []

    def run(case, inputs, **extra):
        with trace.capture() as calls:
            result = run_public_api(case, inputs, **extra)
        calls_seen.append(calls)
        return result

    with trace.capture() as calls:
        check_against_reference(case, run, backend="metal", seed=seed, gradients=True, device=runtime.device)
    served = trace.served_by(calls)
    assert served[("metal", "bwd")] == 1 and served[("torch", "bwd")] == 0, dict(served)
    inputs = make_inputs(case, device=runtime.device, seed=seed, requires_grad=True)
    first = gradients(case, inputs)
    two_schedules.again(lambda: gradients(case, inputs), first)


@pytest.mark.parametrize("case", core_cases()[5::54], ids=lambda c: c.id)
def test_gradients_under_functorch(case, metal_backend):
    """torch.func.vjp through the metal kernels (the op's transform-form autograd, ops.py) gives the reference's
    gradients."""
    check_against_reference(case, backend="metal", seed=2, device=metal_backend.device,
                            vjp=functorch_vjp(case, "metal"))


BACKWARD_CASES = core_cases()[::3]  # 36 of the 108: every dtype, mode, head layout, shape, feature


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: c.id)
def test_backward_feature_matrix(case, metal_backend, two_schedules):
    check_backward(case, metal_backend, two_schedules)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for n, c in enumerate(core_cases()) if n % 3], ids=lambda c: c.id)
def test_backward_rest_of_the_core_matrix(case, metal_backend, two_schedules):
    check_backward(case, metal_backend, two_schedules)


@pytest.mark.parametrize("dim, dim_v, dtype", [(128, 128, torch.float16), (256, 256, torch.bfloat16),
                                               (160, 64, torch.float32), (24, 72, torch.float32)])
def test_backward_head_dims(dim, dim_v, dtype, metal_backend, two_schedules):
    """Head dims beyond 128 (one row/key per simdgroup), D_v != D_qk, dims not multiples of 32."""
    case = Case(dtype=dtype, batch=1, lq=13, lk=21, heads_q=2, heads_kv=1, dim=dim, dim_v=dim_v, causal=True,
                sinks=True)
    check_backward(case, metal_backend, two_schedules)


@pytest.mark.parametrize("shape", [(1, 1, 1, 23), (2, 1, 17, 23), (17, 23)], ids=str)
def test_broadcast_additive_mask_gradient(shape, metal_backend):
    """dmask of a mask broadcast over batch/heads/rows: summed over the broadcast dims."""
    g = torch.Generator().manual_seed(3)
    device = metal_backend.device
    q, k, v = (torch.randn(2, n, 4, 16, generator=g) for n in (17, 23, 23))
    mask = torch.randn(shape, generator=g)
    leaves = [t.clone().to(device).requires_grad_(True) for t in (q, k, v, mask)]
    out = mfa_hf.flash_attn_func(*leaves[:3], attn_mask=leaves[3], causal=True)
    grad = torch.randn(out.shape, generator=g)
    ours = torch.autograd.grad(out, leaves, grad.to(device))
    ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v, mask)]
    ref, _ = attention_reference(*ref_leaves[:3], attn_mask=ref_leaves[3], causal=True)
    want = torch.autograd.grad(ref, ref_leaves, grad.double())
    base_leaves = [t.clone().requires_grad_(True) for t in (q, k, v, mask)]
    base, _ = attention_reference(*base_leaves[:3], attn_mask=base_leaves[3], causal=True, upcast=False)
    baseline = torch.autograd.grad(base, base_leaves, grad)
    for name, a, w, b in zip("qkvm", ours, want, baseline):
        # float32 inputs: delta rounding is below the float32 floor, so no allowance is needed
        assert_close_to_reference(a.cpu(), w, b, GRADIENT_FACTOR, f"d{name}")


@pytest.mark.parametrize("dtype, dim", [(torch.bfloat16, 24), (torch.float32, 24), (torch.float16, 200)], ids=str)
def test_backward_varlen(dtype, dim, metal_backend, two_schedules):
    """Packed sequences (one empty query sequence, one empty key sequence), causal, ALiBi, sinks; D = 200
    stages the held operands in threadgroup memory."""
    lengths_q, lengths_k = [5, 19, 0, 11, 3], [14, 9, 6, 11, 0]
    g = torch.Generator().manual_seed(6)
    device = metal_backend.device
    tq, tk = sum(lengths_q), sum(lengths_k)
    q = torch.randn(tq, 4, dim, generator=g).to(dtype)
    k, v = (torch.randn(tk, 2, dim, generator=g).to(dtype) for _ in range(2))
    cu_q = torch.tensor([0] + list(torch.tensor(lengths_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lengths_k).cumsum(0)), dtype=torch.int32)
    slopes = torch.rand(len(lengths_q), 4, generator=g) * 0.5
    sinks = torch.randn(4, generator=g)
    grad = torch.randn(tq, 4, dim, generator=g).to(dtype)

    def run():
        leaves = [t.clone().to(device).requires_grad_(True) for t in (q, k, v, sinks)]
        out = mfa_hf.flash_attn_varlen_func(*leaves[:3], cu_q.to(device), cu_k.to(device), max(lengths_q),
                                            max(lengths_k), causal=True, alibi_slopes=slopes.to(device),
                                            sinks=leaves[3])
        return torch.autograd.grad(out, leaves, grad.to(device))

    ours = two_schedules(run)
    ref_grads, base_grads = [torch.zeros(t.shape, dtype=torch.float64) for t in (q, k, v, sinks)], []
    base_grads = [torch.zeros(t.shape) for t in (q, k, v, sinks)]
    for b in range(len(lengths_q)):
        rows, keys = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        if rows.start == rows.stop:
            continue
        for upcast, into in ((True, ref_grads), (False, base_grads)):
            cast = (lambda t: t.double()) if upcast else (lambda t: t)  # noqa: E731
            leaves = [cast(t).detach().requires_grad_(True) for t in (q[None, rows], k[None, keys], v[None, keys], sinks)]
            out, _ = attention_reference(*leaves[:3], causal=True, alibi_slopes=slopes[b], sinks=leaves[3], upcast=upcast)
            grads = torch.autograd.grad(out, leaves, cast(grad[None, rows]), allow_unused=True)
            into[0][rows] += grads[0][0].to(into[0].dtype)
            into[1][keys] += grads[1][0].to(into[1].dtype)
            into[2][keys] += grads[2][0].to(into[2].dtype)
            into[3] += grads[3].to(into[3].dtype)
    for name, a, w, b in zip(("dq", "dk", "dv", "dsinks"), ours, ref_grads, base_grads):
        # bf16 rounds O before delta (FA2's design): allow the measured effect of that rounding, 4 ulps of bf16
        extra = 4 * torch.finfo(dtype).eps * float(w.abs().max()) if dtype != torch.float32 else 0.0
        assert_close_to_reference(a.cpu(), w, b, GRADIENT_FACTOR, name, dtype, extra)


def test_trace_shows_the_metal_backward(metal_backend):
    inputs = make_inputs(Case(dtype=torch.float32, lq=9, lk=12), device=metal_backend.device, requires_grad=True)
    with trace.capture() as calls:
        out = mfa_hf.flash_attn_func(inputs["q"], inputs["k"], inputs["v"], causal=True)
        out.sum().backward()
    served = trace.served_by(calls)
    assert served[("metal", "fwd")] == 1 and served[("metal", "bwd")] == 1, dict(served)
    assert served[("torch", "bwd")] == 0, dict(served)


def test_reduce_to_mask_shape():
    full = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    assert torch.equal(metal_backward._reduce_to(full, (1, 3, 1, 5)), full.sum((0, 2), keepdim=True))
    assert torch.equal(metal_backward._reduce_to(full, (4, 5)), full.sum((0, 1)))
    assert torch.equal(metal_backward._reduce_to(full, (2, 3, 4, 5)), full)


@pytest.mark.parametrize("batch, lq, lk, heads", [(0, 4, 5, 2), (2, 0, 5, 2), (2, 4, 0, 2), (2, 4, 5, 0)])
def test_empty_dimensions(metal_backend, batch, lq, lk, heads):
    """No Metal grid dimension may be 0: empty problems answer on the host; rows with no keys still
    give their sink a gradient (lse = sink there)."""
    q = torch.randn(batch, lq, heads, 8, requires_grad=True)
    k, v = (torch.randn(batch, lk, heads or 1, 8, requires_grad=True) for _ in range(2))
    sinks = torch.randn(heads, requires_grad=True)
    out, lse = mfa_hf.flash_attn_func(q, k, v, sinks=sinks, return_lse=True)
    assert out.shape == (batch, lq, heads, 8) and lse.shape == (batch, heads, lq)
    (out.sum() + lse.sum()).backward()
    torch.testing.assert_close(sinks.grad, torch.full((heads,), float(batch * lq if lk == 0 else 0)))


MMA_BOUNDARY_CASES = [
    # rows that see no key (Lq > Lk under causal) and single rows/keys
    Case(dtype=torch.float16, batch=1, lq=33, lk=1, heads_q=2, heads_kv=1, dim=64, dim_v=64, causal=True),
    Case(dtype=torch.float32, batch=1, lq=1, lk=33, heads_q=2, heads_kv=2, dim=16, dim_v=16, causal=True),
    # G = 8 over one KV head; a window that leaves whole 16-row / 32-key blocks empty
    Case(dtype=torch.bfloat16, batch=1, lq=70, lk=97, heads_q=8, heads_kv=1, dim=64, dim_v=64, window=(5, 3)),
    # head dims that are not multiples of 8, D_v != D_qk, an additive mask, more keys than rows
    Case(dtype=torch.float32, batch=2, lq=17, lk=100, heads_q=3, heads_kv=1, dim=20, dim_v=36, causal=True,
         mask="additive"),
    # only the diagonal, ALiBi, a bool mask; D = 128 in both dims, strided (non-vector staging) inputs
    Case(dtype=torch.float16, batch=1, lq=48, lk=48, heads_q=2, heads_kv=2, dim=128, dim_v=128, window=(0, 0),
         alibi=True, strided=True),
    Case(dtype=torch.bfloat16, batch=2, lq=40, lk=40, heads_q=4, heads_kv=2, dim=120, dim_v=8, mask="bool",
         softcap=5.0, sinks=True),
]


LARGE_DIM_CASES = [
    # fp32 at D = 256: one simdgroup, 8-row blocks; G = 4, causal, an additive mask's gradient
    Case(dtype=torch.float32, batch=1, lq=21, lk=45, heads_q=4, heads_kv=1, dim=256, dim_v=256, causal=True,
         mask="additive"),
    # fp16 at D = 192 (4 simdgroups, 16-key blocks at the 32 KiB edge): Lq >> Lk, a window, ALiBi, strided
    Case(dtype=torch.float16, batch=2, lq=70, lk=19, heads_q=2, heads_kv=2, dim=192, dim_v=192, window=(9, 4),
         alibi=True, strided=True),
    # dims that are not multiples of 8 on both sides of 128, G = 8, a bool mask, softcap, sinks
    Case(dtype=torch.bfloat16, batch=1, lq=33, lk=40, heads_q=8, heads_kv=1, dim=130, dim_v=201, mask="bool",
         softcap=4.0, sinks=True),
    # a single query row over many keys, D_v < D_qk
    Case(dtype=torch.float32, batch=2, lq=1, lk=50, heads_q=2, heads_kv=1, dim=160, dim_v=64, causal=True),
    # rows that see nothing (causal, Lq > Lk), fp16 at D = 256 (2 simdgroups), an additive mask
    Case(dtype=torch.float16, batch=1, lq=50, lk=3, heads_q=2, heads_kv=1, dim=256, dim_v=256, causal=True,
         mask="additive"),
]


@pytest.mark.parametrize("case", MMA_BOUNDARY_CASES + LARGE_DIM_CASES, ids=lambda c: c.id)
def test_simdgroup_matrix_tiles(case, metal_backend, two_schedules):
    """The simdgroup_matrix kernels' tiles: partial and empty blocks, rows that see nothing, large groups,
    odd dims, strided staging; above D = 128 the held operands (Q, dO for dQ; K, V for dK/dV) staged once
    in threadgroup memory, the streamed pair taking turns in one tile, fewer simdgroups where 32 KiB demands it."""
    variant = metal_backward.BackwardVariant(case.dtype, case.dim, case.dim_v)
    assert variant.mma and variant.blocks.held_in_tg == (max(case.dim, case.dim_v) > 128)
    size = torch.finfo(case.dtype).bits // 8
    assert variant.blocks.threadgroup_bytes(size) <= metal_backward.THREADGROUP_MEMORY
    check_backward(case, metal_backend, two_schedules)
