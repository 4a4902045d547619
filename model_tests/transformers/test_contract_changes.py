"""The transformers 5.24 contract changes, handled on every tested release: continuous batching
(the model updates the paged cache and hands us the packed batch), packed-sequence masks built with
`and_masks(remap..., packed_sequence_mask_function)`, `cache.update(..., kwargs=...)`, and
MFAQuantizedCache built from a config (5.17's shared layer kwargs)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import kernel_calls, twin_models
from families import BY_NAME

from mfa_hf import trace
from mfa_hf.integrations.transformers import UnsupportedModelError, attention, internals
from mfa_hf.integrations.transformers.quantized_cache import MFAQuantizedCache

PROMPT_LENGTHS = (5, 9, 3)
NEW = 6


def _prompts():
    return [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("name", ["llama", "mistral", "gpt_oss"])  # plain, sliding window, sinks + sliding
def test_continuous_batching_under_mps_flash_equals_generate_or_is_refused(name):
    """generate_batch packs every request into one row with cu_seq_lens; each request's tokens must equal
    plain greedy generate of that prompt alone. Releases whose paged attention functions update the
    cache themselves (up to 5.23) refuse it with our message instead."""
    reference, model = twin_models(BY_NAME[name], "mps_flash")
    config = tf.GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=-1, pad_token_id=0)
    expected = [reference.generate(torch.tensor([p]), generation_config=config)[0, len(p):].tolist()
                for p in _prompts()]
    if internals.paged_names_are_separate():
        with pytest.raises(UnsupportedModelError, match=r"continuous batching.*transformers >= 5\.24.*sdpa"):
            model.generate_batch(inputs=_prompts(), generation_config=config)
        return
    with trace.capture() as calls:
        out = model.generate_batch(inputs=_prompts(), generation_config=config)
    actual = [out[key].generated_tokens for key in sorted(out, key=lambda k: int(k.split("_")[-1]))]
    assert kernel_calls(calls) >= 2 * NEW
    assert actual == expected


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "qwen3"])
def test_packed_position_ids_stay_compact_under_mfa(name, monkeypatch):
    """Restarting position_ids (packing without cu_seq_lens) under "mfa": the mask function returns
    per-token sequence ids, attended as one varlen call (no dense mask), equal to eager on the batch."""
    reference, model = twin_models(BY_NAME[name], "mfa")
    seqs = _prompts()
    ids = torch.tensor([sum(seqs, [])])
    positions = torch.tensor([[i for s in seqs for i in range(len(s))]])
    seen = []
    original = attention._packed_attention
    monkeypatch.setattr(attention, "_packed_attention", lambda *a, **k: seen.append(a[3]) or original(*a, **k))
    with torch.no_grad(), trace.capture() as calls:
        actual = model(ids, position_ids=positions, use_cache=False).logits
        expected = reference(ids, position_ids=positions, use_cache=False).logits
    assert len(seen) == 2 and all(m.dtype == torch.int32 and m.shape == ids.shape for m in seen), seen
    assert kernel_calls(calls) >= 2
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    alone = torch.cat([reference(torch.tensor([s])).logits[0] for s in seqs])
    torch.testing.assert_close(actual[0], alone, atol=1e-5, rtol=1e-4)


def test_quantized_cache_from_config_has_one_layer_per_model_layer():
    """5.17's get_layer_types_and_kwargs returns one shared kwargs dict; a cache with 0 layers failed at
    the first update with an IndexError."""
    config = BY_NAME["gemma2"].config()
    cache = MFAQuantizedCache("int8", config=config)
    assert len(cache.layers) == config.num_hidden_layers
    assert [layer.sliding_window for layer in cache.layers] == [4 if kind == "sliding_attention" else None
                                                                for kind in config.layer_types]


def test_quantized_cache_update_takes_the_attention_kwargs():
    """Since 5.24 attention modules call cache.update(k, v, layer_idx, kwargs=...)."""
    cache = MFAQuantizedCache("int8", config=BY_NAME["llama"].config())
    k = v = torch.randn(1, 2, 3, 16)
    out_k, out_v = cache.update(k, v, 0, kwargs={"cache_position": torch.arange(3)})
    assert out_k is k and out_v is v  # prefill returns the exact K/V
    handle_k, _ = cache.update(k[:, :, :1], v[:, :, :1], 0, kwargs={})
    assert handle_k.shape == (1, 2, 4, 16) and cache.layers[0].dtype == k.dtype


@pytest.mark.parametrize("padded, expected", [(None, "ids"), (6, "ids"), (1, "dense")],
                         ids=["no_padding", "trailing_padding", "padding_inside"])
def test_packed_mask_is_compact_unless_padding_splits_a_sequence(padded, expected):
    """Sequence ids express trailing padding per sequence (-1); padding inside a sequence would split it,
    so only transformers' dense mask expresses it (never a silently different split). transformers builds
    packed masks without a 2-D mask today; the mask function must be right either way."""
    from transformers.masking_utils import and_masks, causal_mask_function, packed_sequence_mask_function

    from mfa_hf.integrations.transformers.masks import PADDING_SEQUENCE, compact_mask

    sequence_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]])
    pattern = and_masks(causal_mask_function, packed_sequence_mask_function(sequence_ids))
    mask = None
    if padded is not None:
        mask = torch.ones(1, 8, dtype=torch.long)
        mask[0, padded] = 0  # 1: inside sequence 0 (token 2 follows); 6: last of sequence 1
    out = compact_mask(1, 8, 8, mask_function=pattern, attention_mask=mask)
    if expected == "dense":
        assert out.dim() == 4 and out.shape[-2:] == (8, 8) and not bool(out[0, 0, 3, 2]), out
    else:
        assert out.dtype == torch.int32 and out.shape == (1, 8), out
        want = sequence_ids.clone().int()
        if padded is not None:
            want[0, 6] = PADDING_SEQUENCE
        assert torch.equal(out, want)
