"""MFAQuantizedCache on model classes a sweep of transformers 5.25's causal LMs found wrong or failing late.

- Moshi passes no sliding_window to attention: a DynamicCache applies its window by keeping only the last
  tokens. The quantized cache keeps its buffer (>= 256 tokens), so decode attended beyond the window (from
  window length to buffer capacity: silently different logits). The layer's own window now reaches the kernel.
- Llama 4's chunked layers (and VLM unions such as Gemma 4 unified's image-token mask) give decode steps a dense
  mask of one query row; it was refused after the prefill had run. A row that is padding then visible keys is
  read as key validity.
- DiffLlama and JetMoE reshape the K/V they get back from the cache (torch.chunk, .repeat): refused when the
  cache is made, not with a QuantizedCacheError at the first decode step.

Exactness is checked with residual_length large enough that nothing is quantized (the cache's own logic, window
and masks, against eager with transformers' DynamicCache); int8 where tokens suffice.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import padded_batch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from mfa_hf import trace
from mfa_hf.integrations.transformers import cache_kwargs
from mfa_hf.integrations.transformers.decode import _row_as_key_validity
from mfa_hf.integrations.transformers.quantized_cache import MFAQuantizedCache

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
GREEDY = dict(do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


def _config(model_type: str, **extra):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"{model_type} is not in transformers {tf.__version__}")
    return AutoConfig.for_model(model_type, **{**SMALL, **extra})


def _twins(config, implementation: str):
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model = AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict(reference.state_dict())
    model.set_attn_implementation(implementation)
    return reference, model


def _generate(model, ids, mask, new, cache=None):
    with torch.no_grad(), trace.capture() as calls:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, **GREEDY,
                             **({} if cache is None else cache_kwargs(cache)))
    return out, sum(trace.served_by(calls).values())


def _assert_same_steps(actual, expected, what):
    for step, (ours, theirs) in enumerate(zip(actual.logits, expected.logits)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4, msg=lambda m: f"{what}, step {step}: {m}")
    assert torch.equal(actual.sequences, expected.sequences), what


@pytest.mark.parametrize("implementation", ["mfa", "mps_flash"])
def test_a_window_left_to_the_cache_is_applied(implementation):
    """Moshi (window 4 here, 3000 in the released config): unquantized (a residual holding every token), ours equals
    eager with DynamicCache(config), which trims to the window; a window-less cache differs (the guard)."""
    config = _config("moshi", sliding_window=4)
    reference, model = _twins(config, implementation)
    ids, mask = padded_batch("left")
    expected, _ = _generate(reference, ids, mask, 6)
    unwindowed, _ = _generate(reference, ids, mask, 6, DynamicCache())
    assert not torch.allclose(unwindowed.logits[-1], expected.logits[-1], atol=1e-3)
    actual, calls = _generate(model, ids, mask, 6, MFAQuantizedCache("int8", config=model.config, residual_length=64))
    assert calls > 0
    _assert_same_steps(actual, expected, f"moshi {implementation}")


@pytest.mark.parametrize("fmt_residual", [("int8", 64), ("int8", 0)], ids=["unquantized", "int8"])
def test_chunked_layers_decode_over_a_quantized_cache(fmt_residual):
    """Llama 4's chunked attention (chunks of 4 here, so decode crosses chunk boundaries): each decode step's dense
    one-row mask is read as key validity (a padding-then-visible row), not refused after the prefill."""
    fmt, residual = fmt_residual
    config = _config("llama4_text", attention_chunk_size=4, intermediate_size_mlp=128, num_local_experts=2,
                     num_experts_per_tok=1)
    reference, model = _twins(config, "mfa")
    ids, mask = padded_batch("left")
    expected, _ = _generate(reference, ids, mask, 6)
    cache = MFAQuantizedCache(fmt, config=model.config, residual_length=residual)
    actual, calls = _generate(model, ids, mask, 6, cache)
    assert calls > 0
    if residual:
        _assert_same_steps(actual, expected, "llama4 chunked")
    else:  # int8 codes: the first step is the exact prefill; later ones within the format's error
        torch.testing.assert_close(actual.logits[0], expected.logits[0], atol=1e-5, rtol=1e-4)
        for ours, theirs in zip(actual.logits[1:], expected.logits[1:]):
            assert (ours - theirs).abs().max() <= 0.05 * theirs.abs().max()


@pytest.mark.parametrize("model_type, what", [("diffllama", r"splits its cached values into two halves"),
                                              ("jetmoe", r"repeats its cached keys and values for each expert")])
def test_models_that_reshape_cached_kv_are_refused_up_front(model_type, what):
    config = _config(model_type)
    with pytest.raises(ValueError, match=rf"MFAQuantizedCache: model_type '{model_type}' {what} .*Use the default "
                                         r"DynamicCache"):
        MFAQuantizedCache("int8", config=config)


def test_a_dense_decode_row_is_key_validity_only_when_it_masks_without_bias():
    minimum = torch.finfo(torch.float32).min
    row = torch.tensor([[minimum, 0.0, 0.0], [-torch.inf, -torch.inf, 0.0]])
    assert torch.equal(_row_as_key_validity(row), torch.tensor([[False, True, True], [False, False, True]]))
    assert torch.equal(_row_as_key_validity(row == 0), row == 0)
    with pytest.raises(NotImplementedError, match=r"expected a decode step's additive mask to hold only 0 and masking "
                                                  r"values, got a finite bias"):
        _row_as_key_validity(torch.tensor([[0.0, -1.5, 0.0]]))


def test_nf4_checks_the_value_head_dim_when_the_model_sets_it_apart():
    """MiMo-V2-Flash-style configs (v_head_dim != head_dim): a value dim the nf4 group does not divide is refused
    when the cache is made, not at the first update inside the forward."""
    config = _config("mimo_v2_flash", head_dim=64, v_head_dim=16)
    with pytest.raises(ValueError, match=r"head_dim: expected a multiple of the nf4 group size 32 .*got 16"):
        MFAQuantizedCache("nf4", config=config, group_size=32)
    MFAQuantizedCache("nf4", config=_config("mimo_v2_flash", head_dim=64, v_head_dim=32), group_size=32)
