"""The triton backend against the float64 reference: on CPU through Triton's interpreter (CI), or on
a CUDA GPU with MFA_TRITON_FULL=1 (every case of the shared matrix, nothing marked slow):

    MFA_TRITON_FULL=1 python -m pytest tests/triton -q          # on a CUDA machine
    python -m pytest tests/triton -q [--run-slow]               # anywhere, interpreter

The interpreter runs each kernel program in numpy (seconds per case), so the default run takes a
seventh of the core matrix plus targeted cases; --run-slow (MFA_SLOW=1) runs the rest. Triton decides
interpretation when a kernel is decorated, i.e. when mfa_hf is imported; a pytest process started
without TRITON_INTERPRET=1 therefore runs this file again in a child process that has it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

import mfa_hf
from mfa_hf import dispatch
from mfa_hf.kernels.reference import attention_reference
from mfa_hf.problem import AttentionProblem
from mfa_hf.testing import Case, assert_close_to_reference, check_against_reference, core_cases, full_cases

from mfa_hf.kernels.triton import forward as triton_forward

FULL = os.environ.get("MFA_TRITON_FULL") == "1"
DEVICE = "cuda" if FULL else "cpu"
INTERPRETED = isinstance(triton_forward.attention_forward_kernel, InterpretedFunction)


@pytest.fixture(autouse=True)
def triton_backend(request, monkeypatch):
    """Force the triton backend (on CPU, through the interpreter)."""
    if request.node.name == "test_interpreter_child_process":
        return
    if FULL and not torch.cuda.is_available():
        pytest.fail("MFA_TRITON_FULL=1 needs a CUDA device; none is visible")
    if not FULL and not INTERPRETED:
        pytest.skip("runs in test_interpreter_child_process (TRITON_INTERPRET=1 was not set at import)")
    monkeypatch.setenv("MFA_BACKEND", "triton")


def test_interpreter_child_process(request):
    """Without TRITON_INTERPRET at import, run this file in a child process that has it."""
    if FULL or INTERPRETED:
        pytest.skip("this process already runs the cases itself")
    env = dict(os.environ, TRITON_INTERPRET="1")
    args = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    if request.config.getoption("--run-slow", default=False):
        args.append("--run-slow")
    done = subprocess.run(args, env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True)
    assert done.returncode == 0, f"interpreter run failed (rc {done.returncode}):\n{done.stdout[-8000:]}{done.stderr[-2000:]}"
    assert " passed" in done.stdout, f"expected passing cases in the child run, got:\n{done.stdout[-2000:]}"


def slow_unless_full(cases):
    return [pytest.param(c, id=c.id, marks=() if FULL else pytest.mark.slow) for c in cases]


def check(case: Case, seed: int = 0, **kwargs):
    check_against_reference(case, backend="triton", seed=seed, device=DEVICE, **kwargs)


CORE = core_cases()
SAMPLED = CORE[::7]  # 16 cases; 7 is coprime with every period of the grid, so all vary


@pytest.mark.parametrize("case", SAMPLED, ids=lambda c: c.id)
def test_core_sample(case):
    check(case)


@pytest.mark.parametrize("case", slow_unless_full([c for n, c in enumerate(CORE) if n % 7]))
def test_core_rest(case):
    check(case)


@pytest.mark.parametrize("case", slow_unless_full(full_cases()))
def test_full_matrix(case):
    check(case, seed=7)


@pytest.mark.parametrize("dim, dim_v", [(256, 256), (128, 64), (1, 3)])
def test_head_dims(dim, dim_v):
    check(Case(dtype=torch.bfloat16, lq=19, lk=33, dim=dim, dim_v=dim_v, causal=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_same_mask_as_reference(dtype):
    case = Case(dtype=dtype, lq=30, lk=41, causal=True, sinks=True, dropout_p=0.3)
    check(case, dropout_seed=torch.tensor(3_000_000_019))  # > 2**31: the hash's uint32 path


def test_fully_masked_rows_and_grad_lse():
    """Rows with nothing visible: output 0, LSE -inf, finite gradients; grad flows through the LSE."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, n, 2, 16, generator=g).to(DEVICE).requires_grad_() for n in (6, 3, 3))
    out, lse = mfa_hf.flash_attn_func(q, k, v, causal=True, return_lse=True)  # rows 0..2 see no key
    assert torch.equal(out[:, :3].detach().cpu(), torch.zeros(1, 3, 2, 16))
    assert bool(torch.isneginf(lse[:, :, :3]).all())
    (out.sum() + lse[:, :, 3:].sum()).backward()
    ref_args = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_reference(*ref_args, causal=True)
    (ref_out.sum() + ref_lse[:, :, 3:].sum()).backward()
    for ours, ref in zip((q, k, v), ref_args):
        assert torch.allclose(ours.grad.cpu().double(), ref.grad, atol=1e-4), "gradient differs from float64"


def _packed(lengths, heads, dim, dtype, generator):
    total = sum(lengths)
    x = torch.randn(total, heads, dim, generator=generator).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return x, cu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_matches_per_sequence_reference(dtype):
    g = torch.Generator().manual_seed(11)
    lengths_q, lengths_k = [5, 0, 23, 17], [9, 4, 23, 0]
    q, cu_q = _packed(lengths_q, 4, 24, dtype, g)
    k, cu_k = _packed(lengths_k, 2, 24, dtype, g)
    v, _ = _packed(lengths_k, 2, 24, dtype, g)
    sinks = torch.randn(4, generator=g)
    leaves = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    out, lse = mfa_hf.flash_attn_varlen_func(*leaves, cu_q.to(DEVICE), cu_k.to(DEVICE), max(lengths_q),
                                             max(lengths_k), causal=True, sinks=sinks.to(DEVICE), return_lse=True)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(out, leaves, grad.to(DEVICE))
    for b in range(len(lengths_q)):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if rows.stop == rows.start:
            continue
        _check_sequence(out, lse, grads, q, k, v, sinks, grad, rows, keys)


def _check_sequence(out, lse, grads, q, k, v, sinks, grad, rows, keys):
    parts = [t[None, s] for t, s in ((q, rows), (k, keys), (v, keys))]
    ref_in = [p.double().requires_grad_() for p in parts]
    base_in = [p.clone().requires_grad_() for p in parts]
    ref, ref_lse = attention_reference(*ref_in, sinks=sinks.double(), causal=True)
    base, base_lse = attention_reference(*base_in, sinks=sinks, causal=True, upcast=False)
    assert_close_to_reference(out[rows].cpu()[None], ref, base, name="out")
    assert_close_to_reference(lse[:, rows].cpu()[None], ref_lse, base_lse, name="lse")
    if ref.numel() == 0 or keys.stop == keys.start:
        assert bool((grads[0][rows] == 0).all()), "dq of a sequence without keys must be 0"
        return
    want = torch.autograd.grad(ref, ref_in, grad[None, rows].double())
    base_grads = torch.autograd.grad(base, base_in, grad[None, rows])
    slices = (rows, keys, keys)
    for name, ours, w, bg, s in zip("qkv", grads, want, base_grads, slices):
        # 1e-3 absolute covers FlashAttention's rounded-delta effect at these magnitudes.
        assert_close_to_reference(ours[s].cpu()[None], w, bg, 3.0, f"d{name}", algorithmic=1e-3)


def test_additive_mask_gradient_broadcast():
    """A (1, 1, Lq, Lk) additive mask's gradient is dS summed over batch and heads."""
    case = Case(dtype=torch.float32, lq=21, lk=18, mask="additive", sinks=True)
    check(case, seed=2)


def _problem(**overrides) -> AttentionProblem:
    fields = dict(device_type="cuda", dtype=torch.bfloat16, batch=1, seqlen_q=8, seqlen_k=8, heads_q=2,
                  heads_kv=2, head_dim_qk=64, head_dim_v=64)
    fields.update(overrides)
    return AttentionProblem(**fields)


def test_supports_reasons(monkeypatch):
    triton_backend = dispatch.backend("triton")
    assert triton_backend.supports(_problem()) == (True, "the triton kernels serve this problem")
    ok, reason = triton_backend.supports(_problem(dtype=torch.float64))
    assert not ok and "float64" in reason
    ok, reason = triton_backend.supports(_problem(kv_format="int8"))
    assert not ok and "int8" in reason
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = triton_backend.supports(_problem(device_type="cpu"))
    assert not ok and "cpu" in reason


def test_forced_triton_raises_with_reason_for_float64():
    q = torch.randn(1, 4, 1, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(mfa_hf.BackendUnavailable, match="float64"):
        mfa_hf.flash_attn_func(q, q, q)


def test_sequence_lengths_do_not_recompile():
    if not FULL:
        pytest.skip("compilation happens on CUDA only (the interpreter compiles nothing)")
    from mfa_hf.kernels.triton import forward as fwd

    def run(n):
        x = torch.randn(1, n, 2, 64, device="cuda", dtype=torch.bfloat16)
        mfa_hf.flash_attn_func(x, x, x, causal=True)

    run(100)
    caches = fwd.attention_forward_kernel.device_caches  # triton 3.x: device -> (kernel cache, ...)
    before = sum(len(entry[0]) for entry in caches.values())
    for n in (37, 128, 1000, 4096):
        run(n)
    after = sum(len(entry[0]) for entry in caches.values())
    assert after == before, f"expected no new compilations across lengths, got {after - before}"
