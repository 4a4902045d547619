"""SDPA's meaning in our terms (mfa_hf.sdpa_semantics), through every caller, and validation's twins.

- The translation of SDPA's top-left is_causal, used through mfa_hf.flash_attention, the SDPA patch and
  diffusers' attend_bshd / attend_bhsd, equals stock SDPA run in float64 on the CPU (DESIGN.md's rule:
  2 x PyTorch's own error in the input dtype for outputs, 3 x for gradients), gradients included; keys
  no query sees get exactly zero gradient.
- With Lq < Lk nothing of Lq x Lk elements is made: the translation attends over the first Lq keys.
- mfa_hf.problem's non-raising twins give the message the raising check raises, and "" for valid input.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import mfa_hf
from mfa_hf import problem, sdpa_semantics, trace
from mfa_hf.integrations import sdpa_patch
from mfa_hf.integrations.diffusers.attend import attend_bhsd, attend_bshd
from mfa_hf.testing import GRADIENT_FACTOR, assert_close_to_reference, delta_rounding_effect

STOCK = torch._C._nn.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def stock_sdpa_afterwards():
    yield
    sdpa_patch.restore_sdpa()
    assert F.scaled_dot_product_attention is STOCK


# --- the translation itself -------------------------------------------------------------------------

@pytest.mark.parametrize("lq, lk, expected", [
    (7, 7, sdpa_semantics.Translation(keys=None, causal=True)),
    (9, 4, sdpa_semantics.Translation(keys=None, causal=False, window=(-1, 5))),
    (1, 4, sdpa_semantics.Translation(keys=1, causal=True)),
    (3, 11, sdpa_semantics.Translation(keys=3, causal=True)),
], ids=["square", "more_queries", "one_query", "fewer_queries"])
def test_translation_of_top_left_causal(lq, lk, expected):
    assert sdpa_semantics.translate(lq, lk, True) == expected
    assert sdpa_semantics.translate(lq, lk, False) == sdpa_semantics.Translation(keys=None, causal=False)


def test_a_mask_is_narrowed_with_the_keys():
    """keep_mask narrows the key dimension as keep_keys narrows k and v (a view), unless it broadcasts."""
    fewer, square = sdpa_semantics.translate(3, 5, True), sdpa_semantics.translate(5, 5, True)
    mask = torch.rand(2, 1, 3, 5) > 0.5
    kept = fewer.keep_mask(mask)
    assert kept.shape == (2, 1, 3, 3) and kept.data_ptr() == mask.data_ptr() and torch.equal(kept, mask[..., :3])
    for broadcast in (torch.ones(2, 1, 3, 1, dtype=torch.bool), torch.tensor(True), None):
        assert fewer.keep_mask(broadcast) is broadcast
    assert square.keep_mask(mask) is mask and sdpa_semantics.translate(3, 5, False).keep_mask(mask) is mask
    assert sdpa_semantics.causal_with_mask(True, mask) and not sdpa_semantics.causal_with_mask(False, mask)


def test_kept_keys_are_views_not_copies():
    k, v = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 5)
    kept_k, kept_v = sdpa_semantics.translate(4, 10, True).keep_keys(k, v, seq_dim=2)
    assert kept_k.shape == (2, 3, 4, 4) and kept_v.shape == (2, 3, 4, 5)
    assert kept_k.data_ptr() == k.data_ptr() and kept_v.data_ptr() == v.data_ptr()
    assert kept_k._base is k and kept_v._base is v


# --- every caller against float64 SDPA ------------------------------------------------------------

LENGTHS = [(1, 1), (1, 9), (5, 9), (9, 9), (9, 5), (9, 1), (16, 7)]
HEADS = [(4, 4), (4, 2)]
DTYPES = [torch.float32, torch.float16]
GRID = list(itertools.product(LENGTHS, (False, True), HEADS, DTYPES))


def _id(lengths, causal, heads, dtype) -> str:
    return f"lq{lengths[0]}-lk{lengths[1]}-{'causal' if causal else 'full'}-h{heads[0]}/{heads[1]}-{str(dtype)[6:]}"


GRID_IDS = [_id(*case) for case in GRID]


def _inputs(lengths, heads, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    (lq, lk), (heads_q, heads_kv) = lengths, heads
    q = torch.randn(2, heads_q, lq, 16, generator=generator)
    k = torch.randn(2, heads_kv, lk, 16, generator=generator)
    v = torch.randn(2, heads_kv, lk, 8, generator=generator)
    grad = torch.randn(2, heads_q, lq, 8, generator=generator)
    return [t.to(dtype) for t in (q, k, v)], grad.to(dtype)


def _top_left_lse(q, k, is_causal, gqa):
    """logsumexp of SDPA's scores (B, H, Lq), in q's dtype, with top-left causal; the test's own math."""
    if gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if is_causal:
        visible = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores.logsumexp(-1)


def _assert_matches_float64_sdpa(call, lengths, is_causal, heads, dtype, seed=0):
    """call(q, k, v, is_causal, enable_gqa) -> (out (B, H, Lq, Dv), lse (B, H, Lq) or None), on our kernel."""
    (q, k, v), grad = _inputs(lengths, heads, dtype, seed)
    gqa = heads[0] != heads[1]
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    with trace.capture() as served:
        out, lse = call(*mine, is_causal, gqa)
    assert sum(trace.served_by(served).values()) >= 1, "our kernel did not run"
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = STOCK(*leaves64, is_causal=is_causal, enable_gqa=gqa)
    ref_lse = _top_left_lse(*leaves64[:2], is_causal, gqa)
    stock_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    base = STOCK(*stock_leaves, is_causal=is_causal, enable_gqa=gqa)  # PyTorch's own error in dtype
    assert_close_to_reference(out, ref, base)
    if lse is not None:
        assert_close_to_reference(lse, ref_lse, _top_left_lse(q, k, is_causal, gqa), dtype=dtype, name="lse")

    ours = torch.autograd.grad(out, mine, grad)
    want = torch.autograd.grad(ref, leaves64, grad.double(), retain_graph=True)
    baseline = torch.autograd.grad(base, stock_leaves, grad)
    # FlashAttention's backward takes rowsum(dO * O) from the rounded output, by design: allowed exactly.
    effects = delta_rounding_effect(out.transpose(1, 2), ref.transpose(1, 2), ref_lse, leaves64,
                                    grad.transpose(1, 2))
    for name, got, exact, stock, extra in zip("qkv", ours, want, baseline, effects):
        assert_close_to_reference(got, exact, stock, GRADIENT_FACTOR, f"d{name}", dtype, extra)
    lq, lk = lengths
    if is_causal and lq < lk:  # no query sees keys Lq..Lk-1: exactly zero gradient, as SDPA gives
        for got in ours[1:]:
            assert torch.equal(got[:, :, lq:], torch.zeros_like(got[:, :, lq:]))


def _translated(q, k, v, is_causal, gqa):
    sdpa = sdpa_semantics.translate(q.shape[-2], k.shape[-2], is_causal)
    k, v = sdpa.keep_keys(k, v, seq_dim=2)
    return mfa_hf.flash_attention(q, k, v, is_causal=sdpa.causal, window_size=sdpa.window, return_lse=True)


def _patched(q, k, v, is_causal, gqa):
    mfa_hf.replace_sdpa(devices=("cpu",), min_scores=0)
    try:
        with trace.capture_fallbacks() as fell:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)
    finally:
        mfa_hf.restore_sdpa()
    assert not fell, dict(fell)
    return out, None


def _diffusers_bshd(q, k, v, is_causal, gqa):
    out, lse = attend_bshd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=is_causal,
                           enable_gqa=gqa, return_lse=True)
    return out.transpose(1, 2), lse.transpose(1, 2)


def _diffusers_bhsd(q, k, v, is_causal, gqa):
    assert not is_causal  # attend_bhsd (the processors' call) has no is_causal
    return attend_bhsd(q, k, v), None


@pytest.mark.parametrize("lengths, is_causal, heads, dtype", GRID, ids=GRID_IDS)
def test_translation_through_flash_attention_equals_sdpa(lengths, is_causal, heads, dtype):
    _assert_matches_float64_sdpa(_translated, lengths, is_causal, heads, dtype, seed=1)


@pytest.mark.parametrize("lengths, is_causal, heads, dtype", GRID, ids=GRID_IDS)
def test_sdpa_patch_equals_sdpa(lengths, is_causal, heads, dtype):
    _assert_matches_float64_sdpa(_patched, lengths, is_causal, heads, dtype, seed=2)


@pytest.mark.parametrize("lengths, is_causal, heads, dtype", GRID, ids=GRID_IDS)
def test_diffusers_attend_bshd_equals_sdpa(lengths, is_causal, heads, dtype):
    _assert_matches_float64_sdpa(_diffusers_bshd, lengths, is_causal, heads, dtype, seed=3)


BHSD_GRID = [case for case in GRID if not case[1]]


@pytest.mark.parametrize("lengths, is_causal, heads, dtype", BHSD_GRID, ids=[_id(*case) for case in BHSD_GRID])
def test_diffusers_attend_bhsd_equals_sdpa(lengths, is_causal, heads, dtype):
    _assert_matches_float64_sdpa(_diffusers_bhsd, lengths, is_causal, heads, dtype, seed=4)


MASKS = ["bool (B, 1, Lq, Lk)", "additive (B, H, Lq, Lk)", "bool (Lq, Lk)", "key padding (B, Lk)",
         "additive (B, 1, 1, Lk)"]


def _mask(kind, lq, lk, heads, dtype, generator):
    if kind == "bool (B, 1, Lq, Lk)":
        return torch.rand(2, 1, lq, lk, generator=generator) > 0.3
    if kind == "additive (B, H, Lq, Lk)":
        return torch.randn(2, heads, lq, lk, generator=generator).to(dtype)
    if kind == "bool (Lq, Lk)":
        return torch.rand(lq, lk, generator=generator) > 0.3
    if kind == "key padding (B, Lk)":
        return torch.rand(2, lk, generator=generator) > 0.3
    return torch.randn(2, 1, 1, lk, generator=generator).to(dtype)


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("lengths", [(5, 9), (9, 9), (9, 5), (1, 9)], ids=lambda n: f"lq{n[0]}-lk{n[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_diffusers_attend_bshd_causal_with_a_mask_means_mask_and_top_left(kind, lengths, dtype):
    """The diffusers backend's is_causal with attn_mask: the mask AND top-left causal, against float64 SDPA of
    that combined mask (gradients included) and against stock SDPA given the pair where it accepts that (torch's
    fused CPU kernel does, without grad and with Dv == D; its math path raises). Rows whose keys are all masked out give 0 here
    (DESIGN.md) where SDPA gives NaN: compared on the rest."""
    lq, lk = lengths
    generator = torch.Generator().manual_seed(lq * 100 + lk)
    (q, k, v), grad = _inputs(lengths, (4, 4), dtype, seed=lq + lk)
    mask = _mask(kind, lq, lk, 4, dtype, generator)
    sdpa_mask = mask[:, None, None, :] if kind == "key padding (B, Lk)" else mask  # diffusers' 2-D meaning
    top_left = torch.ones(lq, lk, dtype=torch.bool).tril()
    if sdpa_mask.dtype == torch.bool:
        combined = combined64 = sdpa_mask & top_left
    else:
        combined = sdpa_mask.masked_fill(~top_left, float("-inf"))
        combined64 = sdpa_mask.double().masked_fill(~top_left, float("-inf"))
    seen = (combined64 if combined64.dtype == torch.bool else combined64 > float("-inf")).expand(2, 4, lq, lk).any(-1)
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attend_bshd(*(t.transpose(1, 2) for t in mine), attn_mask=mask, is_causal=True, return_lse=True)
    out = out.transpose(1, 2)
    assert torch.equal(out[~seen], torch.zeros_like(out[~seen]))  # rows that see no key: 0, not NaN
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = STOCK(*leaves64, attn_mask=combined64)
    stock_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    stock = STOCK(*stock_leaves, attn_mask=combined)  # PyTorch's own error in dtype
    rows = seen[..., None]
    assert_close_to_reference(out.where(rows, 0), ref.where(rows, 0), stock.where(rows, 0))
    square_v = v[..., :1].expand_as(k).contiguous()  # Dv == D: what the fused kernel takes
    mine_square = attend_bshd(*(t.transpose(1, 2) for t in (q, k, square_v)), attn_mask=mask, is_causal=True)
    with torch.no_grad():
        pair = STOCK(q, k, square_v, attn_mask=sdpa_mask, is_causal=True)  # as torch's fused CPU kernel reads it
    assert_close_to_reference(mine_square.transpose(1, 2).where(rows, 0), pair.double().where(rows, 0),
                              STOCK(q, k, square_v, attn_mask=combined).where(rows, 0),
                              name="output against stock SDPA given is_causal and the mask")
    if not seen.all():
        return
    ours = torch.autograd.grad(out, mine, grad)
    want = torch.autograd.grad(ref, leaves64, grad.double(), retain_graph=True)
    baseline = torch.autograd.grad(stock, stock_leaves, grad)
    scores = (leaves64[0] @ leaves64[1].transpose(-1, -2)) * 16 ** -0.5
    scores = scores.masked_fill(~combined64, float("-inf")) if combined64.dtype == torch.bool else scores + combined64
    effects = delta_rounding_effect(out.transpose(1, 2), ref.transpose(1, 2), scores.logsumexp(-1), leaves64,
                                    grad.transpose(1, 2))
    for name, got, exact, stock_grad, extra in zip("qkv", ours, want, baseline, effects):
        assert_close_to_reference(got, exact, stock_grad, GRADIENT_FACTOR, f"d{name}", dtype, extra)


def test_bottom_right_causal_would_fail_the_comparison():
    # The comparison can fail: FlashAttention's own (bottom-right) causal differs from SDPA's for Lq < Lk.
    def bottom_right(q, k, v, is_causal, gqa):
        return mfa_hf.flash_attention(q, k, v, is_causal=is_causal, return_lse=True)

    with pytest.raises(AssertionError, match="output: max error"):
        _assert_matches_float64_sdpa(bottom_right, (5, 9), True, (4, 4), torch.float32)


# --- no (Lq, Lk) tensor when Lq < Lk ----------------------------------------------------------------

LQ, LK = 64, 4096  # a (Lq, Lk) mask, even a bool one, would be larger than q, k, v or any gradient


class _LargestOutputs(TorchDispatchMode):
    """The element count of every tensor an op returns (ops called here; a custom op counts as one)."""

    def __init__(self):
        super().__init__()
        self.numels: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numels += [(t.numel(), str(func)) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _largest(fn) -> tuple[int, int]:
    """(largest element count returned by an op called from fn, largest allocation in bytes made by any op,
    inside our kernels included) over fn's forward and backward."""
    watch = _LargestOutputs()
    with watch:
        fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocated = max(e.self_cpu_memory_usage for e in prof.events())
    return max(watch.numels)[0], allocated


def _forward_backward(call):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, LQ, 8, generator=generator, requires_grad=True)
    k = torch.randn(1, 1, LK, 8, generator=generator, requires_grad=True)
    v = torch.randn(1, 1, LK, 8, generator=generator, requires_grad=True)
    assert 4 * k.numel() < LQ * LK  # k's gradient in float32 bytes stays below a bool mask's

    def run():
        out = call(q, k, v)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()

    return run


def _old_mask_translation(q, k, v):
    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    return mfa_hf.flash_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("caller", ["flash_attention", "sdpa_patch", "diffusers_bshd"])
def test_fewer_queries_than_keys_never_makes_an_lq_by_lk_tensor(caller):
    calls = {
        "flash_attention": lambda q, k, v: _translated(q, k, v, True, False),
        "sdpa_patch": lambda q, k, v: _patched(q, k, v, True, False),
        "diffusers_bshd": lambda q, k, v: _diffusers_bshd(q, k, v, True, False),
    }
    numel, allocated = _largest(_forward_backward(calls[caller]))
    assert numel < LQ * LK, numel
    assert allocated < LQ * LK, allocated  # bytes: a bool (Lq, Lk) mask alone is Lq * Lk bytes


def test_the_memory_check_catches_a_mask():
    numel, allocated = _largest(_forward_backward(_old_mask_translation))
    assert numel >= LQ * LK and allocated >= LQ * LK


# --- validation's non-raising twins ---------------------------------------------------------------

def _bshd(lq=5, lk=6, heads_q=4, heads_kv=2, dim=8, dim_v=8, dtype=torch.float32):
    return (torch.randn(2, lq, heads_q, dim, dtype=dtype), torch.randn(2, lk, heads_kv, dim, dtype=dtype),
            torch.randn(2, lk, heads_kv, dim_v, dtype=dtype))


QKV_CASES = {
    "not_a_tensor": lambda: (*_bshd()[:2], [1.0]),
    "rank": lambda: (_bshd()[0][0], *_bshd()[1:]),
    "int_dtype": lambda: tuple(t.int() for t in _bshd()),
    "mixed_dtype": lambda: (_bshd()[0], _bshd()[1].half(), _bshd()[2]),
    "device_mismatch": lambda: (_bshd()[0], _bshd()[1].to("meta"), _bshd()[2]),
    "heads_not_dividing": lambda: _bshd(heads_kv=3),
    "head_dim_0": lambda: _bshd(dim=0),
    "head_dim_v_0": lambda: _bshd(dim_v=0),
    "v_keys": lambda: (*_bshd()[:2], _bshd()[2][:, :3]),
}


@pytest.mark.parametrize("name", sorted(QKV_CASES))
def test_qkv_twin_gives_the_message_check_qkv_raises(name):
    q, k, v = QKV_CASES[name]()
    with pytest.raises((TypeError, ValueError)) as raised:
        problem.check_qkv(q, k, v, 4, "(B, S, H, D)")
    assert problem.qkv_reason(q, k, v, 4, "(B, S, H, D)") == str(raised.value)
    assert str(raised.value).startswith(("q:", "k:", "v:"))


def test_rank_twin_gives_the_message_check_rank_raises():
    q, k, v = _bshd()
    for args in ((q[0], k, v), (q, k, "v")):
        with pytest.raises((TypeError, ValueError)) as raised:
            problem.check_rank(*args, 4, "(B, S, H, D)")
        assert problem.rank_reason(*args, 4, "(B, S, H, D)") == str(raised.value)
    assert problem.rank_reason(q, k, v, 4, "(B, S, H, D)") == ""


def test_valid_inputs_give_no_reason_and_heads_first_layouts_are_read_in_place():
    q, k, v = _bshd()
    problem.check_qkv(q, k, v, 4, "(B, S, H, D)")
    assert problem.qkv_reason(q, k, v, 4, "(B, S, H, D)") == ""
    bhsd = [t.transpose(1, 2) for t in (q, k, v)]
    assert problem.qkv_reason(*bhsd, 4, "(B, H, S, D)", seq_dim=-2, head_dim=-3) == ""
    bad = [t.transpose(1, 2) for t in _bshd(heads_kv=3)]
    assert problem.qkv_reason(*bad, 4, "(B, H, S, D)", seq_dim=-2, head_dim=-3) == (
        "k: expected a number of KV heads dividing 4 query heads, got 3")


MASK_CASES = {
    "wrong_shape": lambda: torch.ones(2, 3, 5, 6, dtype=torch.bool),
    "rank_5": lambda: torch.ones(1, 2, 4, 5, 6, dtype=torch.bool),
    "int_dtype": lambda: torch.ones(5, 6, dtype=torch.int64),
    "device_mismatch": lambda: torch.ones(5, 6, dtype=torch.bool, device="meta"),
    "not_a_tensor": lambda: [[True] * 6] * 5,
}


@pytest.mark.parametrize("name", sorted(MASK_CASES))
def test_mask_twin_gives_the_message_check_mask_raises(name):
    mask, args = MASK_CASES[name](), (2, 4, 5, 6, torch.device("cpu"))
    with pytest.raises((TypeError, ValueError)) as raised:
        problem.check_mask(mask, *args)
    assert problem.mask_reason(mask, *args) == str(raised.value)
    assert str(raised.value).startswith("attn_mask:")


@pytest.mark.parametrize("mask", [None, torch.ones(5, 6, dtype=torch.bool), torch.zeros(2, 1, 1, 6),
                                  torch.zeros(4, 5, 6, dtype=torch.float16)], ids=["none", "bool", "float", "half"])
def test_valid_masks_give_no_reason(mask):
    args = (2, 4, 5, 6, torch.device("cpu"))
    problem.check_mask(mask, *args)
    assert problem.mask_reason(mask, *args) == ""


def _bhsd(heads_q=4, heads_kv=4, dim=16, dim_v=16):
    return torch.randn(2, heads_q, 9, dim), torch.randn(2, heads_kv, 13, dim), torch.randn(2, heads_kv, 13, dim_v)


PATCH_TWIN_CASES = {
    "heads_not_dividing": (lambda: _bhsd(heads_kv=3), dict(enable_gqa=True)),
    "head_dim_0": (lambda: _bhsd(dim=0, dim_v=0), {}),
    "mask_shape": (lambda: _bhsd(), dict(attn_mask=torch.ones(2, 3, 9, 13, dtype=torch.bool))),
    "mask_int_dtype": (lambda: _bhsd(), dict(attn_mask=torch.ones(9, 13, dtype=torch.int64))),
}


@pytest.mark.parametrize("name", sorted(PATCH_TWIN_CASES))
def test_sdpa_patch_falls_back_with_the_twins_message(name):
    make, kwargs = PATCH_TWIN_CASES[name]
    q, k, v = make()
    bshd = [t.transpose(1, 2) for t in (q, k, v)]
    mask = kwargs.get("attn_mask")
    expected = problem.qkv_reason(*bshd, 4, "(B, S, H, D)") or problem.mask_reason(mask, 2, 4, 9, 13, q.device)
    assert expected
    mfa_hf.replace_sdpa(devices=("cpu",), min_scores=0)
    try:
        with trace.capture_fallbacks() as fell, trace.capture() as served:
            try:
                F.scaled_dot_product_attention(q, k, v, **kwargs)
            except (RuntimeError, IndexError):
                pass  # stock SDPA's own answer for this call
    finally:
        mfa_hf.restore_sdpa()
    assert not served
    assert [reason for _, reason in fell] == [expected]
