"""flash_attention(..., bf16_backward=True): the backward's matmuls on bfloat16 operands, float32 sums.

Tolerance (DESIGN.md's rule with the precision the option asks for): each gradient within 3x the error
of PyTorch's own math in bfloat16 on the same inputs (+ the floor, + FlashAttention's delta rounding),
against the float64 reference. The option must also really act: float32 gradients get bfloat16-sized
error, far above the default backward's.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mfa_hf
from mfa_hf import dispatch, ops, routes, trace
from mfa_hf.testing import (GRADIENT_FACTOR, Case, assert_close_to_reference, delta_rounding_effect, differentiable,
                            make_inputs, reference_of)

CASES = [
    Case(torch.float32, lq=37, lk=50, heads_q=4, heads_kv=2, causal=True),
    Case(torch.float32, lq=50, lk=29, heads_q=4, heads_kv=1, window=(5, 3), mask="additive"),
    Case(torch.float16, lq=33, lk=33, heads_q=4, heads_kv=4, causal=True, sinks=True, strided=True),
    Case(torch.float16, lq=37, lk=50, heads_q=4, heads_kv=2, softcap=3.0, alibi=True, mask="bool"),
    Case(torch.bfloat16, lq=33, lk=33, heads_q=4, heads_kv=2, dim=59, dim_v=59, causal=True),
]


def _run(case, inputs, bf16_backward):
    return mfa_hf.flash_attn_func(inputs["q"], inputs["k"], inputs["v"], attn_mask=inputs["attn_mask"],
                                  alibi_slopes=inputs["alibi_slopes"], sinks=inputs["sinks"], return_lse=True,
                                  bf16_backward=bf16_backward, **case.options())


def _cpu_leaf(t):
    if not isinstance(t, torch.Tensor):
        return t
    return t.detach().cpu().requires_grad_(t.requires_grad)


def _bfloat16_copy(inputs):
    return {n: (t.detach().to(torch.bfloat16).requires_grad_(t.requires_grad)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and n in ("q", "k", "v") else t)
            for n, t in inputs.items()}


def _errors_against_reference(case, seed=0, backend="torch", device="cpu"):
    """(errors of the default backward, errors with bf16_backward), asserting the tolerance on the latter.
    The kernel runs on `device`; the references on CPU copies of its inputs."""
    on_device = make_inputs(case, device=device, seed=seed, requires_grad=True)
    inputs = {n: _cpu_leaf(t) for n, t in on_device.items()}
    names = differentiable(inputs)
    grad = torch.randn(case.batch, case.lq, case.heads_q, case.dim_v, generator=torch.Generator().manual_seed(9))
    ref, ref_lse, ref_args = reference_of(case, inputs, upcast=True)
    want = torch.autograd.grad(ref, [ref_args[n] for n in names], grad.double(), retain_graph=True)
    bf16_case = Case(**{**case.__dict__, "dtype": torch.bfloat16})
    base, _, base_args = reference_of(bf16_case, _bfloat16_copy(inputs), upcast=False)
    baseline = torch.autograd.grad(base, [base_args[n] for n in names], grad.to(torch.bfloat16))
    errors = {}
    for bf16 in (False, True):
        with trace.capture() as calls:
            out, _ = _run(case, on_device, bf16)
            ours = torch.autograd.grad(out, [on_device[n] for n in names], grad.to(out.dtype).to(device))
        assert trace.served_by(calls)[(backend, "bwd")] == 1, dict(trace.served_by(calls))
        out, ours = out.cpu(), [g.cpu() for g in ours]
        errors[bf16] = {n: float((g.double() - w).abs().max()) for n, g, w in zip(names, ours, want)}
        if bf16:
            effect = delta_rounding_effect(out, ref, ref_lse, [ref_args[n] for n in names], grad, names, case, inputs)
            for name, g, w, b, extra in zip(names, ours, want, baseline, effect):
                assert_close_to_reference(g, w, b, GRADIENT_FACTOR, f"d{name}", torch.bfloat16, extra)
    return errors[False], errors[True]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gradients_within_bfloat16_tolerance(case, small_tiles, monkeypatch):
    monkeypatch.setenv("MFA_BACKEND", "torch")
    default, bf16 = _errors_against_reference(case)
    if case.dtype == torch.float32:  # the option really acted: bfloat16-sized error, not float32's
        assert all(bf16[n] > 100 * default[n] for n in ("q", "k", "v")), (default, bf16)


def test_forward_is_unchanged_and_compile_keeps_the_option(monkeypatch):
    monkeypatch.setenv("MFA_BACKEND", "torch")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 40, 32, generator=g).requires_grad_() for _ in range(3))
    grad = torch.randn(2, 4, 40, 32, generator=g)

    def attention(a, b, c, bf16):
        return mfa_hf.flash_attention(a, b, c, is_causal=True, bf16_backward=bf16)

    plain = attention(q, k, v, False)
    eager = attention(q, k, v, True)
    assert torch.equal(plain, eager)
    eager_grads = torch.autograd.grad(eager, (q, k, v), grad)
    default_grads = torch.autograd.grad(plain, (q, k, v), grad)
    compiled = torch.compile(attention, fullgraph=True, dynamic=False)(q, k, v, True)
    compiled_grads = torch.autograd.grad(compiled, (q, k, v), grad)
    for e, c, d in zip(eager_grads, compiled_grads, default_grads):
        torch.testing.assert_close(c, e, rtol=0, atol=1e-6)
        assert not torch.allclose(e, d, rtol=0, atol=1e-6)  # the compiled graph carried bf16_backward


def test_native_route_declines_it():
    """The platform's SDPA would run a float32 backward: a call that asks for bf16 stays with our kernels."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=g).requires_grad_() for _ in range(3))
    with trace.capture_routes() as chosen, trace.capture() as calls:
        mfa_hf.flash_attention(q, k, v, is_causal=True, bf16_backward=True).sum().backward()
    assert ("ours", "bf16_backward (SDPA's backward has no bfloat16 mode)") in chosen, dict(chosen)
    assert trace.served_by(calls)[("torch", "bwd")] == 1, dict(trace.served_by(calls))
    call = mfa_hf.api.validated_call(*(q.transpose(1, 2),) * 3, causal=True, bf16_backward=True)
    problem = ops.describe(call, needs_grad=True)
    assert problem.bf16_backward and "bf16_backward" in problem.flags()
    assert not ops.describe(call, needs_grad=False).bf16_backward  # inference: nothing to decline
    assert routes.semantic_reason(problem, wants_lse=False) == "bf16_backward (SDPA's backward has no bfloat16 mode)"


def test_metal_refuses_it_clearly():
    with pytest.raises(NotImplementedError, match=r"bf16_backward=True: the metal backend.*bf16_backward=False.*"
                                                  r"MFA_BACKEND=torch"):
        ops.refuse_bf16_backward(dispatch.backend("metal").impl)
    ops.refuse_bf16_backward(dispatch.backend("torch").impl)  # implemented: no error


def test_metal_refuses_it_at_the_forward(monkeypatch):
    monkeypatch.setenv("MFA_BACKEND", "metal")
    monkeypatch.setenv("MFA_METAL_EMULATOR", "1")
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    try:
        dispatch.select(_plain_problem(q))
    except dispatch.BackendUnavailable as unavailable:
        pytest.skip(f"the Metal backend cannot run here: {unavailable}")
    with pytest.raises(NotImplementedError, match="bf16_backward=True: the metal backend"):
        mfa_hf.flash_attention(q, q, q, bf16_backward=True)
    with torch.no_grad():  # inference: nothing to refuse
        mfa_hf.flash_attention(q, q, q, bf16_backward=True)


def _plain_problem(q):
    return ops.describe(mfa_hf.api.validated_call(*(q.transpose(1, 2),) * 3), needs_grad=True)


@pytest.mark.parametrize("value, error, message", [
    ("yes", TypeError, "bf16_backward: expected a bool, got 'yes'"),
    (2, TypeError, "bf16_backward: expected a bool, got 2"),
])
def test_bad_flag_is_named(value, error, message):
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(error, match=message):
        mfa_hf.flash_attention(q, q, q, bf16_backward=value)


def test_float64_is_refused():
    q = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"bf16_backward: expected float16, bfloat16 or float32 inputs .*float64"):
        mfa_hf.flash_attn_func(q, q, q, bf16_backward=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cuda_backends(case, backend, monkeypatch):
    monkeypatch.setenv("MFA_BACKEND", backend)
    default, bf16 = _errors_against_reference(case, backend=backend, device="cuda")
    if case.dtype == torch.float32:
        assert all(bf16[n] > 100 * default[n] for n in ("q", "k", "v")), (default, bf16)


TRITON_SCRIPT = """
import torch, mfa_hf
from mfa_hf.kernels import launch
from mfa_hf.testing import Case
import test_migration_bf16_backward as t
launch.POISON_OUTPUTS = True
for case in (Case(torch.float32, lq=37, lk=50, heads_q=4, heads_kv=2, causal=True, dim=32, dim_v=32),
             Case(torch.float16, lq=33, lk=33, heads_q=2, heads_kv=1, window=(5, 3), dim=32, dim_v=32)):
    default, bf16 = t._errors_against_reference(case, backend="triton")
    print(case.id, default, bf16)
"""


def test_triton_backend_under_the_interpreter():
    """The triton launcher's bf16 copies, through Triton's interpreter (a child process: it must be set
    before triton is imported)."""
    pytest.importorskip("triton")
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "MFA_BACKEND": "triton", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("\n") == 2
