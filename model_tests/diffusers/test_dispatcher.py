"""The "mfa" backend of diffusers' dispatcher: the function's semantics against SDPA, the three ways
to select it, and diffusers' global active backend left as it was."""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend

from mfa_hf import trace
from mfa_hf.integrations.diffusers import BACKEND_NAME, enable, mfa_attention


def _bshd(batch=2, seq=5, heads=4, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, heads, dim, generator=generator)


def _sdpa_bshd(query, key, value, **kwargs):
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), **kwargs)
    return out.transpose(1, 2)


def test_backend_name_resolves_everywhere_diffusers_looks():
    member = AttentionBackendName(BACKEND_NAME)
    assert member.value == "mfa" and member in list(AttentionBackendName)
    assert _AttentionBackendRegistry._backends[member] is mfa_attention
    assert {"attn_mask", "return_lse", "scale", "is_causal", "enable_gqa"} <= _AttentionBackendRegistry._supported_arg_names[member]


@pytest.mark.parametrize("mask_kind", ["bool_4d", "additive_4d", "key_padding_2d"])
def test_masks_match_sdpa(mask_kind):
    query, key, value = _bshd(seq=6, seed=1), _bshd(seq=9, seed=2), _bshd(seq=9, seed=3)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 5:] = False
    masks = {
        "bool_4d": keep[:, None, None, :],
        "additive_4d": torch.randn(2, 4, 1, 9),
        "key_padding_2d": keep,
    }
    mask = masks[mask_kind]
    sdpa_mask = mask[:, None, None, :] if mask.dim() == 2 else mask
    with trace.capture() as calls:
        actual = mfa_attention(query, key, value, attn_mask=mask)
    assert sum(trace.served_by(calls).values()) == 1
    torch.testing.assert_close(actual, _sdpa_bshd(query, key, value, attn_mask=sdpa_mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lq,lk", [(5, 5), (3, 7), (7, 3)], ids=["square", "fewer_queries", "more_queries"])
def test_is_causal_aligns_top_left_like_sdpa(lq, lk):
    query, key, value = _bshd(seq=lq, seed=4), _bshd(seq=lk, seed=5), _bshd(seq=lk, seed=6)
    actual = mfa_attention(query, key, value, is_causal=True)
    torch.testing.assert_close(actual, _sdpa_bshd(query, key, value, is_causal=True), atol=1e-5, rtol=1e-5)


def test_return_lse_is_bshd_float32_logsumexp():
    query, key, value = _bshd(seed=7), _bshd(seq=6, seed=8), _bshd(seq=6, seed=9)
    out, lse = mfa_attention(query, key, value, scale=0.3, return_lse=True)
    scores = torch.einsum("bqhd,bkhd->bhqk", query, key) * 0.3
    expected_lse = torch.logsumexp(scores, dim=-1).transpose(1, 2)  # (B, Lq, H)
    assert lse.dtype == torch.float32 and lse.shape == (2, 5, 4)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, _sdpa_bshd(query, key, value, scale=0.3), atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_needs_enable_gqa_like_sdpa():
    query, key, value = _bshd(heads=4, seed=10), _bshd(heads=2, seed=11), _bshd(heads=2, seed=12)
    expected = _sdpa_bshd(query, key, value, enable_gqa=True)
    torch.testing.assert_close(mfa_attention(query, key, value, enable_gqa=True), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="key: expected 4 heads like query .*enable_gqa.* got 2"):
        mfa_attention(query, key, value)


BATCHES = [(2, 1, 1), (1, 2, 2), (2, 2, 1), (2, 1, 2), (1, 1, 2), (2, 2, 2)]  # (query, key, value)
MASKS = [None, "causal", "batch 1", "batch 2", "key padding"]


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("batches", BATCHES, ids=lambda b: "q{}k{}v{}".format(*b))
def test_batch_dims_of_one_broadcast_like_sdpa(batches, mask):
    """Wan with num_videos_per_prompt=2 and its own prompt_embeds passes K/V of batch 1 against queries of batch 2:
    SDPA broadcasts them, and we refused them ('k, v: expected batch 2 like q'). Both entry points (the dispatcher's
    BSHD call, the processors' BHSD call), every batch that broadcasts, with masks and causal."""
    from mfa_hf.integrations.diffusers.attend import attend_bhsd

    query, key, value = (_bshd(batch=b, seq=n, seed=20 + i) for i, (b, n) in enumerate(zip(batches, (4, 6, 6))))
    keep = torch.rand(max(batches), 1, 4, 6, generator=torch.Generator().manual_seed(9)) > 0.3
    masks = {None: None, "causal": None, "batch 1": keep[:1], "batch 2": keep, "key padding": keep[:, 0, 0]}
    sdpa_mask = keep[:, :, :1] if mask == "key padding" else masks[mask]
    causal = mask == "causal"
    batch = max(batches)  # broadcast by hand for SDPA: its math kernel refuses a query of batch 1 with a mask of 2
    expected = _sdpa_bshd(*(t.expand(batch, *t.shape[1:]) for t in (query, key, value)), attn_mask=sdpa_mask,
                          is_causal=causal)
    actual = mfa_attention(query, key, value, attn_mask=masks[mask], is_causal=causal)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    if not causal:
        transposed = attend_bhsd(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                 attn_mask=sdpa_mask)
        torch.testing.assert_close(transposed.transpose(1, 2), expected, atol=1e-5, rtol=1e-5)


def test_batches_that_do_not_broadcast_are_refused_by_name():
    with pytest.raises(ValueError, match=r"k, v: expected batch 3 like q, got 2"):
        mfa_attention(_bshd(batch=3), _bshd(batch=2), _bshd(batch=2))


def test_refusals_name_the_argument():
    query = _bshd()
    with pytest.raises(NotImplementedError, match="_parallel_config"):
        mfa_attention(query, query, query, _parallel_config=object())


def test_is_causal_with_a_mask_is_served_as_both():
    """The pair means the mask AND top-left causal, as torch's SDPA computes it where it accepts the pair
    (tests/test_sdpa_semantics.py covers lengths, mask shapes, dtypes and gradients)."""
    query = _bshd(seed=5)
    padding = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    padding[1, ..., 3:] = False
    actual = mfa_attention(query, query, query, attn_mask=padding, is_causal=True)
    both = padding & torch.ones(5, 5, dtype=torch.bool).tril()
    expected = _sdpa_bshd(query, query, query, attn_mask=both)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_fully_masked_row_gives_zero(mask_dtype):
    """Documented in the README: a row with no visible key gives 0, never NaN (SDPA gives NaN on
    some backends and torch versions; torch 2.13's CPU math path also gives 0 for a bool mask)."""
    query = _bshd(seed=13)
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[0, 0, 2, :] = False
    mask = keep if mask_dtype == torch.bool else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    actual = mfa_attention(query, query, query, attn_mask=mask)
    assert torch.equal(actual[0, 2], torch.zeros_like(actual[0, 2]))
    torch.testing.assert_close(actual[1], _sdpa_bshd(query, query, query)[1], atol=1e-5, rtol=1e-5)


def _flux_pair(tiny):
    default, inputs = tiny.build("flux")
    return default, copy.deepcopy(default), inputs


def test_context_manager_selects_mfa_and_restores_the_global(tiny, active_backend_guard):
    default, ours, inputs = _flux_pair(tiny)
    expected, _ = tiny.run_counting(default, inputs)
    with attention_backend("mfa"):
        assert _AttentionBackendRegistry._active_backend.value == "mfa"
        actual, calls = tiny.run_counting(ours, inputs)
    assert _AttentionBackendRegistry._active_backend is active_backend_guard
    assert calls == 3  # one double-stream block, two single-stream blocks
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_set_attention_backend_works_and_changes_the_global_as_documented(tiny, active_backend_guard):
    default, ours, inputs = _flux_pair(tiny)
    expected, _ = tiny.run_counting(default, inputs)
    ours.set_attention_backend("mfa")
    actual, calls = tiny.run_counting(ours, inputs)
    assert calls == 3
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # diffusers' own API sets the global active backend too (README: "What set_attention_backend changes")
    assert _AttentionBackendRegistry._active_backend.value == "mfa"
    ours.reset_attention_backend()
    assert _AttentionBackendRegistry._active_backend.value == "mfa", "diffusers behaviour changed: update the README"


def test_enable_and_restore_leave_the_global_backend_alone(tiny, active_backend_guard):
    default, ours, inputs = _flux_pair(tiny)
    handle = enable(ours)
    assert _AttentionBackendRegistry._active_backend is active_backend_guard
    _, calls = tiny.run_counting(ours, inputs)
    assert calls == 3
    handle.restore()
    assert _AttentionBackendRegistry._active_backend is active_backend_guard
    assert all("_attention_backend" not in module.processor.__dict__ for module in ours.modules()
               if hasattr(module, "processor"))
    _, calls_after = tiny.run_counting(ours, inputs)
    assert calls_after == 0, "restore() must put the model back on its original backend"


@pytest.mark.parametrize("model", ["flux", "unet"])
@pytest.mark.parametrize("order", ["first handle first", "last handle first"])
def test_enable_twice_then_both_restores_give_the_original_back(tiny, active_backend_guard, model, order):
    """The second enable() finds every module ours already (processors, and dispatcher processors on "mfa") and
    records nothing: it recorded "mfa" as the dispatcher processors' original, so restoring both handles left Flux
    on "mfa"."""
    default, inputs = tiny.build(model)
    ours = copy.deepcopy(default)
    before = {name: (type(p), p.__dict__.get("_attention_backend", "unset")) for name, p in ours.attn_processors.items()}
    first, second = enable(ours), enable(ours)
    assert second.summary() == {} or not any(second.summary().values()), second.summary()
    for handle in ((first, second) if order == "first handle first" else (second, first)):
        handle.restore()
    after = {name: (type(p), p.__dict__.get("_attention_backend", "unset")) for name, p in ours.attn_processors.items()}
    assert after == before
    _, calls = tiny.run_counting(ours, inputs)
    assert calls == 0

