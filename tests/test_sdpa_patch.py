"""The opt-in SDPA patch: SDPA's meaning on its whole argument matrix, clean restore, stock fallbacks.

The gate is opened for CPU (devices=("cpu",), min_scores=0) so the torch backend serves here; each
served case asserts our kernel ran, each fallback case asserts the traced reason.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mfa_hf
from mfa_hf import trace
from mfa_hf.integrations import sdpa_patch

STOCK = torch._C._nn.scaled_dot_product_attention
OPEN_GATE = dict(devices=("cpu",), min_scores=0)


@pytest.fixture(autouse=True)
def always_restored():
    yield
    sdpa_patch.restore_sdpa()
    assert F.scaled_dot_product_attention is STOCK


def _qkv(batch=2, heads_q=4, heads_kv=4, lq=9, lk=13, dim=16, dim_v=None, dtype=torch.float32, rank=4):
    shape = (batch,) if rank == 4 else ()
    q = torch.randn(*shape, heads_q, lq, dim, dtype=dtype)
    k = torch.randn(*shape, heads_kv, lk, dim, dtype=dtype)
    v = torch.randn(*shape, heads_kv, lk, dim_v or dim, dtype=dtype)
    return q, k, v


def _served(*args, **kwargs):
    """(our output, stock output) for one call, asserting our kernel served it and nothing fell back."""
    expected = STOCK(*args, **kwargs)
    with sdpa_patch.sdpa_patched(**OPEN_GATE), trace.capture() as served, trace.capture_fallbacks() as fell:
        out = F.scaled_dot_product_attention(*args, **kwargs)
    assert not fell, dict(fell)
    assert sum(trace.served_by(served).values()) == 1, dict(served)
    return out, expected


def _fallback(*args, inner_calls_served=False, **kwargs):
    """(reasons, output) for a call the patch must hand to stock SDPA."""
    with sdpa_patch.sdpa_patched(**OPEN_GATE), trace.capture() as served, trace.capture_fallbacks() as fell:
        out = F.scaled_dot_product_attention(*args, **kwargs)
    assert bool(served) == inner_calls_served, dict(served)
    return [reason for (_, reason) in fell], out


def _mask_shapes(batch, heads, lq, lk):
    """Every shape broadcastable to (B, H, Lq, Lk) that stock SDPA takes: ranks 2..4, each dim 1 or full."""
    full = (batch, heads, lq, lk)
    for rank in range(2, 5):
        for ones in itertools.product((False, True), repeat=rank):
            yield tuple(1 if one else n for one, n in zip(ones, full[4 - rank:]))


def _mask(shape, kind, lk):
    if kind == "bool":
        mask = torch.rand(shape) > 0.3
        return mask
    # Additive values of every size, -inf included; -2000 must be added, not thresholded to -inf.
    mask = torch.randn(shape) * 3
    mask[torch.rand(shape) > 0.8] = float("-inf")
    mask[torch.rand(shape) > 0.9] = -2000.0
    return mask


MASK_CASES = [(kind, shape) for kind in ("bool", "float") for shape in _mask_shapes(2, 4, 9, 13)]


@pytest.mark.parametrize("kind,shape", MASK_CASES, ids=[f"{k}-{'x'.join(map(str, s))}" for k, s in MASK_CASES])
def test_masks_of_every_broadcast_shape(kind, shape):
    torch.manual_seed(len(shape) * 31 + sum(shape))
    q, k, v = _qkv()
    out, expected = _served(q, k, v, attn_mask=_mask(shape, kind, 13))
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


CAUSAL_CASES = list(itertools.product((False, True), ((9, 13), (13, 13), (13, 9), (1, 13), (13, 1)),
                                      ((4, 4), (4, 2), (4, 1)), (None, 0.3)))


@pytest.mark.parametrize("causal,lengths,heads,scale", CAUSAL_CASES,
                         ids=[f"causal{c}-lq{l[0]}-lk{l[1]}-h{h[0]}/{h[1]}-scale{s}" for c, l, h, s in CAUSAL_CASES])
def test_causal_scale_gqa_and_unequal_lengths(causal, lengths, heads, scale):
    torch.manual_seed(7)
    q, k, v = _qkv(heads_q=heads[0], heads_kv=heads[1], lq=lengths[0], lk=lengths[1], dim_v=8)
    out, expected = _served(q, k, v, is_causal=causal, scale=scale, enable_gqa=heads[0] != heads[1])
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


def test_top_left_causal_is_not_bottom_right():
    # A test that can fail: with Lq < Lk, FlashAttention's bottom-right causal differs from SDPA's.
    q, k, v = _qkv(lq=4, lk=12)
    out, expected = _served(q, k, v, is_causal=True)
    bottom_right = mfa_hf.flash_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    assert (bottom_right - expected).abs().max() > 1e-2


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_unbatched_three_dim_inputs(mask_kind):
    q, k, v = _qkv(rank=3, heads_q=4, heads_kv=2)
    mask = None if mask_kind == "none" else _mask((4, 9, 13) if mask_kind == "bool" else (9, 13), mask_kind, 13)
    out, expected = _served(q, k, v, attn_mask=mask, enable_gqa=True)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", ["same", "float32", "bool"])
def test_low_precision_within_twice_stock_error(dtype, mask_dtype):
    torch.manual_seed(3)
    q, k, v = _qkv(lq=33, lk=47, dtype=dtype)
    mask = torch.randn(1, 4, 33, 47) if mask_dtype != "bool" else torch.rand(2, 1, 1, 47) > 0.2
    mask = mask.to(dtype) if mask_dtype == "same" else mask
    out, expected = _served(q, k, v, attn_mask=mask, scale=0.2)
    ref = STOCK(q.double(), k.double(), v.double(), attn_mask=mask if mask.dtype == torch.bool else mask.double(),
                scale=0.2)
    stock_error = (expected.double() - ref).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 2 * stock_error + 1e-3


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_match_stock(kind):
    q, k, v = _qkv()
    mask = torch.ones(9, 13, dtype=torch.bool)
    mask[[2, 5]] = False
    if kind == "float":
        mask = torch.zeros(9, 13).masked_fill(~mask, float("-inf"))
    out, expected = _served(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    assert not out.isnan().any()


def test_gradients_match_stock_with_additive_mask():
    q, k, v = _qkv(heads_kv=2, lq=11, lk=11)
    mask = torch.randn(1, 4, 11, 11, requires_grad=True)
    inputs = [t.requires_grad_() for t in (q, k, v)] + [mask]
    expected = STOCK(q, k, v, attn_mask=mask, enable_gqa=True)
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs)
    with sdpa_patch.sdpa_patched(**OPEN_GATE), trace.capture() as served:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert served
    for got, want in zip(torch.autograd.grad(out.square().sum(), inputs), expected_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _nested_qkv():
    parts = [torch.randn(2, n, 8) for n in (3, 5)]
    nested = torch.nested.nested_tensor(parts, layout=torch.jagged)
    return nested.transpose(1, 2), nested.transpose(1, 2), nested.transpose(1, 2)


FALLBACKS = {
    "dropout": (lambda: _qkv(), dict(dropout_p=0.3), "dropout_p > 0"),
    "mask_and_causal": (lambda: _qkv(), dict(attn_mask=torch.ones(9, 13, dtype=torch.bool), is_causal=True),
                        "attn_mask with is_causal"),
    "head_broadcast_without_enable_gqa": (lambda: _qkv(heads_kv=1), {}, "without enable_gqa"),
    "five_dims": (lambda: tuple(t.unsqueeze(0) for t in _qkv()), {}, "ranks"),
    "empty_keys": (lambda: _qkv(lk=0), {}, "empty"),
    "float64_mask_on_float32": (lambda: _qkv(), dict(attn_mask=torch.zeros(9, 13, dtype=torch.float64)), "dtype"),
    "nested": (_nested_qkv, {}, "nested"),
    "one_dim_mask": (lambda: _qkv(), dict(attn_mask=torch.ones(13, dtype=torch.bool)), "attn_mask shape"),
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_unsupported_calls_go_to_stock_unchanged(name):
    make, kwargs, reason = FALLBACKS[name]
    torch.manual_seed(11)
    q, k, v = make()
    try:
        torch.manual_seed(5)
        expected = STOCK(q, k, v, **kwargs)
    except (RuntimeError, IndexError) as error:  # stock raises: the patched call must raise the same
        with pytest.raises(type(error), match=str(error)[:40].replace("(", r"\(").replace(")", r"\)")):
            _fallback(q, k, v, **kwargs)
        return
    torch.manual_seed(5)  # dropout: the same RNG stream gives stock's exact output
    if name == "nested":
        # Stock SDPA on jagged tensors calls F.scaled_dot_product_attention again on dense pieces;
        # those are ordinary SDPA calls, which the patch may serve.
        reasons, out = _fallback(q, k, v, inner_calls_served=True, **kwargs)
        assert reasons[0] == "nested tensors", reasons
        torch.testing.assert_close(out.values(), expected.values(), atol=2e-5, rtol=1e-5)
        return
    reasons, out = _fallback(q, k, v, **kwargs)
    assert len(reasons) == 1 and reason in reasons[0], reasons
    assert torch.equal(out, expected)


def test_gate_keeps_other_devices_and_small_calls_on_stock():
    q, k, v = _qkv()
    with sdpa_patch.sdpa_patched(), trace.capture_fallbacks() as fell:  # default gate: mps and cuda only
        F.scaled_dot_product_attention(q, k, v)
    with sdpa_patch.sdpa_patched(devices=("cpu",), min_scores=9 * 13 + 1), trace.capture_fallbacks() as small:
        F.scaled_dot_product_attention(q, k, v)
    with sdpa_patch.sdpa_patched(devices=("cpu",), min_scores=9 * 13), trace.capture() as served:
        F.scaled_dot_product_attention(q, k, v)
    assert [reason for _, reason in fell] == ["device cpu not enabled (devices=('mps', 'cuda'))"]
    assert [reason for _, reason in small] == [f"Lq*Lk below min_scores={9 * 13 + 1}"]
    assert served


def test_never_patched_on_import_and_restores_cleanly():
    code = ("import torch, torch.nn.functional as F, mfa_hf; "
            "assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention; print('ok')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"
    mfa_hf.replace_sdpa()
    mfa_hf.replace_sdpa(devices=("cpu",))  # again: only the gate changes, no double wrap
    assert F.scaled_dot_product_attention is sdpa_patch.patched_sdpa
    mfa_hf.restore_sdpa()
    assert F.scaled_dot_product_attention is STOCK
    mfa_hf.restore_sdpa()  # not patched: a no-op
    assert F.scaled_dot_product_attention is STOCK


def test_nested_context_managers_restore_the_outer_gate():
    with mfa_hf.sdpa_patched(devices=("cpu",), min_scores=5):
        with mfa_hf.sdpa_patched(devices=("mps",), min_scores=7):
            assert sdpa_patch._gate == sdpa_patch.Gate(("mps",), 7)
        assert sdpa_patch._gate == sdpa_patch.Gate(("cpu",), 5)
        assert F.scaled_dot_product_attention is sdpa_patch.patched_sdpa
    assert F.scaled_dot_product_attention is STOCK


def test_restore_refuses_to_drop_a_later_patch():
    mfa_hf.replace_sdpa()
    later = lambda *a, **kw: STOCK(*a, **kw)  # noqa: E731 -- another library patching after us
    F.scaled_dot_product_attention = later
    with pytest.raises(RuntimeError, match="patched again after replace_sdpa"):
        mfa_hf.restore_sdpa()
    F.scaled_dot_product_attention = sdpa_patch.patched_sdpa


def test_bad_gate_arguments_name_themselves():
    with pytest.raises(TypeError, match="devices: expected a tuple"):
        mfa_hf.replace_sdpa(devices="cpu")
    with pytest.raises(ValueError, match="min_scores: expected an int >= 0"):
        mfa_hf.replace_sdpa(min_scores=-1)
    assert F.scaled_dot_product_attention is STOCK


def test_sdpa_called_inside_our_kernel_goes_to_stock(monkeypatch):
    # Reentrancy: were a backend ever to call SDPA, it must reach stock, not recurse into the patch.
    real = sdpa_patch.api.flash_attention

    def calls_sdpa_inside(q, k, v, **kwargs):
        F.scaled_dot_product_attention(q, k, v)
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(sdpa_patch.api, "flash_attention", calls_sdpa_inside)
    q, k, v = _qkv()
    reasons, out = _fallback_inside(q, k, v)
    assert reasons == ["called from inside an mfa-hf kernel"]
    torch.testing.assert_close(out, STOCK(q, k, v), atol=2e-5, rtol=1e-5)


def _fallback_inside(q, k, v):
    with sdpa_patch.sdpa_patched(**OPEN_GATE), trace.capture_fallbacks() as fell:
        out = F.scaled_dot_product_attention(q, k, v)
    return [reason for _, reason in fell], out


def test_mfa_trace_prints_fallback_reasons():
    code = ("import torch, torch.nn.functional as F, mfa_hf\n"
            "q = torch.randn(1, 2, 8, 16)\n"
            "with mfa_hf.sdpa_patched(devices=('cpu',), min_scores=0):\n"
            "    F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)\n"
            "    F.scaled_dot_product_attention(q, q, q)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**__import__("os").environ, "MFA_TRACE": "1"})
    assert result.returncode == 0, result.stderr
    assert "sdpa_patch: dropout_p > 0" in result.stderr
    # the patched call reaches flash_attention, whose router sends this exact case back to the fused CPU kernel
    assert "native   fwd" in result.stderr and "sdpa-cpu-flash: native has our semantics here" in result.stderr


def test_sdpa_patched_from_many_threads_restores_the_original():
    """8 threads x 50 blocks at once: the patch stays installed while any block is open (each thread
    sees it inside its block and gets SDPA's answer), and the original is back after the last one."""
    import threading

    threads, blocks = 8, 50
    q, k, v = _qkv(batch=1, heads_q=2, heads_kv=2, lq=4, lk=4, dim=8)
    want = STOCK(q, k, v)
    barrier, failures = threading.Barrier(threads), []

    def work():
        barrier.wait()
        for _ in range(blocks):
            try:
                with sdpa_patch.sdpa_patched(**OPEN_GATE):
                    if F.scaled_dot_product_attention is not sdpa_patch.patched_sdpa:
                        failures.append("not patched inside a block")
                    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), want, atol=2e-5, rtol=1e-5)
            except Exception as error:  # noqa: BLE001 -- reported below
                failures.append(repr(error))

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert not failures, failures[:3]
    assert F.scaled_dot_product_attention is STOCK and not sdpa_patch.is_patched()
    assert sdpa_patch._holds == [] and sdpa_patch._gate is None


def test_threads_keep_their_own_gate_and_others_see_the_process_gate(monkeypatch):
    """Process-wide patch: a thread with no block still goes through it (with the newest block's gate);
    a thread inside a block uses its own innermost gate; replace_sdpa and blocks hold it together."""
    import threading

    gates = {}  # thread id -> the gate patched_sdpa applied to its last call
    real = sdpa_patch.unserved_reason

    def recording(gate, *args):
        gates[threading.get_ident()] = gate
        return real(gate, *args)

    monkeypatch.setattr(sdpa_patch, "unserved_reason", recording)
    q = torch.randn(1, 1, 2, 4)

    def gate_here():
        F.scaled_dot_product_attention(q, q, q)
        return gates.pop(threading.get_ident())

    def in_new_thread(fn):
        result = []
        thread = threading.Thread(target=lambda: result.append(fn()))
        thread.start()
        thread.join(10)
        return result[0]

    entered, leave, seen = threading.Event(), threading.Event(), {}

    def other():
        with sdpa_patch.sdpa_patched(devices=("mps",), min_scores=7):
            seen["other thread, in its block"] = gate_here()
            entered.set()
            leave.wait(10)

    worker = threading.Thread(target=other)
    with sdpa_patch.sdpa_patched(devices=("cpu",), min_scores=5):
        worker.start()
        assert entered.wait(10)
        seen["main thread, in its block"] = gate_here()
        seen["no block, both open"] = in_new_thread(gate_here)
        leave.set()
        worker.join(10)
        seen["no block, main open"] = in_new_thread(gate_here)
        assert F.scaled_dot_product_attention is sdpa_patch.patched_sdpa  # the main block is still open
    assert seen == {"other thread, in its block": sdpa_patch.Gate(("mps",), 7),
                    "main thread, in its block": sdpa_patch.Gate(("cpu",), 5),
                    "no block, both open": sdpa_patch.Gate(("mps",), 7),  # the newest open block's
                    "no block, main open": sdpa_patch.Gate(("cpu",), 5)}
    assert F.scaled_dot_product_attention is STOCK
    mfa_hf.replace_sdpa(devices=("cpu",))
    with sdpa_patch.sdpa_patched(devices=("mps",)):
        mfa_hf.restore_sdpa()  # ends replace_sdpa's hold; the block still holds the patch
        assert F.scaled_dot_product_attention is sdpa_patch.patched_sdpa
    assert F.scaled_dot_product_attention is STOCK
