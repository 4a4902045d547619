"""Backend selection, MFA_BACKEND, MFA_TRACE, torch.library registration and torch.compile."""

import os
import subprocess
import sys

import pytest
import torch

import mfa_hf
from mfa_hf import dispatch, trace

OPS = dispatch.backend("torch").ops  # the torch backend's registered ops (mfa_hf/ops.py)


def small_qkv(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 4, 8, generator=g) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]
    return [t.contiguous().requires_grad_(requires_grad) for t in (q, k, v)]


def test_auto_routes_to_native_where_exact_else_selects_torch_on_cpu_and_trace_counts_it(monkeypatch):
    monkeypatch.delenv("MFA_BACKEND", raising=False)
    with trace.capture() as calls, trace.capture_routes() as routes:
        out = mfa_hf.flash_attn_func(*small_qkv(), causal=True)  # square causal: SDPA's fused CPU kernel is exact
        mfa_hf.flash_attn_func(*small_qkv(), causal=True, softcap=2.0)  # no native softcap: ours
    assert out.shape == (2, 9, 4, 8)
    assert calls == {("native", "fwd", "float32", 8, 9, 9, "causal gqa=2 path=sdpa-cpu-flash"): 1,
                     ("torch", "fwd", "float32", 8, 9, 9, "causal softcap gqa=2"): 1}
    assert routes == {("sdpa-cpu-flash", "native has our semantics here"): 1, ("ours", "softcap"): 1}


@pytest.mark.parametrize("forced", ["metal", "triton"])
def test_forcing_a_backend_that_cannot_serve_raises_with_its_reason(monkeypatch, forced):
    monkeypatch.setenv("MFA_BACKEND", forced)
    with pytest.raises(mfa_hf.BackendUnavailable, match=f"MFA_BACKEND={forced} cannot serve this call: .+"):
        mfa_hf.flash_attn_func(*small_qkv())


def test_forcing_torch_works_and_unknown_names_are_rejected(monkeypatch):
    monkeypatch.setenv("MFA_BACKEND", "torch")
    assert mfa_hf.flash_attn_func(*small_qkv()).shape == (2, 9, 4, 8)
    monkeypatch.setenv("MFA_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"MFA_BACKEND: expected one of auto, native, metal, triton, torch, "
                                         r"got 'cuda'"):
        mfa_hf.flash_attn_func(*small_qkv())


def test_supports_reports_reasons():
    problem = mfa_hf.AttentionProblem("cpu", torch.float32, 1, 8, 8, 2, 2, 8, 8)
    for name in dispatch.PRIORITY:
        ok, reason = dispatch.backend(name).supports(problem)
        assert isinstance(ok, bool) and reason


def test_trace_report_printed_at_exit():
    code = ("import torch, mfa_hf; q = torch.randn(1, 5, 2, 8); "
            "mfa_hf.flash_attn_func(q, q, q, causal=True); mfa_hf.flash_attn_func(q, q, q, causal=True)")
    for backend, routed in (("torch", False), ("auto", True)):
        env = dict(os.environ, MFA_TRACE="1", MFA_BACKEND=backend)
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "mfa_hf trace" in result.stderr
        served = "native" if routed else "torch"
        assert any(line.split()[:7] == [served, "fwd", "float32", "8", "5", "5", "2"]
                   for line in result.stderr.splitlines()), result.stderr
        assert ("2  sdpa-cpu-flash: native has our semantics here" in result.stderr) == routed, result.stderr


def test_opcheck_forward_and_backward():
    q, k, v = small_qkv(requires_grad=True)
    mask = torch.randn(2, 1, 9, 9)
    sinks = torch.randn(4, requires_grad=True)
    # (tensors..., scale, window_left, window_right (causal folded: 0), softcap, dropout_p, max_seqlen_q/k)
    args = (q, k, v, mask, None, sinks, None, None, None, 0.3, 3, 0, 0.0, 0.0, 0, 0)
    torch.library.opcheck(OPS.forward.op, args)
    out, lse = OPS.forward.op(*args)
    bwd_args = (torch.randn_like(out), None, out.detach(), lse.detach(), True, q.detach(), k.detach(), v.detach(),
                mask, None, sinks.detach(), None, None, None, 0.3, 3, 0, 0.0, 0.0, 0, 0)
    torch.library.opcheck(OPS.backward, bwd_args)


def test_eager_calls_skip_the_dispatcher_and_everything_else_goes_through_the_op(monkeypatch):
    """Plain eager calls run the op's implementation directly (the dispatcher's host cost is paid by every
    layer of every decode step), and eager calls that record autograd its autograd.Function; calls that run
    under a tracer's dispatch mode (fake tensors) or a functorch transform go through the registered op. All
    give identical results."""
    through_op = []
    op = OPS.forward.op

    def counting_op(*args):
        through_op.append(1)
        return op(*args)

    monkeypatch.setattr(OPS.forward, "op", counting_op)
    monkeypatch.setenv("MFA_BACKEND", "torch")  # our op, not the native route
    q, k, v = small_qkv()
    with torch.no_grad():
        direct = mfa_hf.flash_attn_func(q, k, v, causal=True)
    assert through_op == [], "a no-grad eager call should not need the dispatcher"
    assert torch.equal(direct, op(q, k, v, None, None, None, None, None, None, 8 ** -0.5, -1, 0, 0.0, 0.0, 0, 0)[0])
    mfa_hf.flash_attn_func(q, k, v, causal=True)  # grad enabled, but nothing requires grad: still direct
    assert through_op == []

    # Eager calls that record autograd take the op's autograd as an autograd.Function (ops.define_ops: the
    # same setup_context and backward, without the dispatcher): the same output and the same gradients as the op.
    leaves = small_qkv(requires_grad=True)
    out = mfa_hf.flash_attn_func(*leaves, causal=True)
    assert through_op == [] and type(out.grad_fn).__name__.startswith("torch_attention"), out.grad_fn
    assert torch.equal(out.detach(), direct)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    op_leaves = small_qkv(requires_grad=True)
    op_out = op(*op_leaves, None, None, None, None, None, None, 8 ** -0.5, -1, 0, 0.0, 0.0, 0, 0)[0]
    assert type(op_out.grad_fn).__name__.startswith("GeneratedBackwardFor_mfa_hf_torch_attention_fwd")
    for ours, theirs in zip(grads, torch.autograd.grad((op_out * weights).sum(), op_leaves)):
        assert torch.equal(ours, theirs)

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mfa_hf.flash_attn_func(*(mode.from_tensor(t) for t in (q, k, v)), causal=True)
    assert through_op == [1] and fake.shape == direct.shape

    from mfa_hf.ops import plain_eager

    inside_vmap = torch.func.vmap(lambda x: torch.tensor(plain_eager((x,))))(q)
    assert not inside_vmap.any(), "under vmap the op (and its batching rules or error) must be used"
    assert plain_eager((q, 3, None, "none")) and not plain_eager((leaves[0],))


def test_decode_op_passes_opcheck_and_shortcut_matches_it():
    from mfa_hf.kernels.contract import DecodeCall

    DECODE = OPS.decode
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1, 4, 8, generator=g)
    cache = torch.randn(2, 12, 2, 8, generator=g)
    args = (q, cache, None, cache, None, torch.tensor([12, 5], dtype=torch.int32), None, None, None, "none", "none",
            8, 8, 0.35, -1, 0, 0.0, 0)
    torch.library.opcheck(DECODE.op, args)
    assert all(torch.equal(a, b) for a, b in zip(DECODE(DecodeCall.from_op_args(args)), DECODE.op(*args)))


def test_torch_compile_fullgraph_forward_and_backward():
    def attention(q, k, v, sinks):
        return mfa_hf.flash_attn_func(q, k, v, causal=True, softcap=4.0, sinks=sinks).square().sum()

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    q, k, v = small_qkv(requires_grad=True)
    sinks = torch.randn(4, requires_grad=True)
    with trace.capture() as calls:
        loss = compiled(q, k, v, sinks)
        grads = torch.autograd.grad(loss, (q, k, v, sinks))
    want = torch.autograd.grad(attention(q, k, v, sinks), (q, k, v, sinks))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)
    assert trace.served_by(calls)[("torch", "bwd")] == 1


def test_torch_compile_inductor_varlen():
    q = torch.randn(10, 4, 8)
    kv = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    fn = torch.compile(lambda q, k, v: mfa_hf.flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, causal=True),
                       fullgraph=True)
    torch.testing.assert_close(fn(q, kv, kv), mfa_hf.flash_attn_varlen_func(q, kv, kv, cu, cu, 6, 6, causal=True))


def test_nested_captures_are_independent():
    q = small_qkv()
    with trace.capture() as outer:
        with trace.capture() as inner:
            pass
        # Equal (empty) counters: leaving `inner` must not remove `outer`.
        mfa_hf.flash_attn_func(*q)
    assert sum(outer.values()) == 1 and not inner
