"""Gemma 4: its global layers are 512 wide (per_layer_config head_dim 512 in the released configs), wider than the
compiled kernels; the torch backend serves them (tests/test_wide_head_dims.py). The first forward raised
"q: expected a head dim in 1..256" under both names, after the model had been accepted at init."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from conftest import IMPLEMENTATIONS, assert_logits_like_eager, kernel_calls, padded_batch

from mfa_hf import trace


def _gemma4():
    if not hasattr(tf, "Gemma4TextConfig"):
        pytest.skip(f"Gemma 4 is not in transformers {tf.__version__}")
    return tf.Gemma4TextConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                               max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"],
                               per_layer_config={"01": {"head_dim": 512}}, hidden_size_per_layer_input=16,
                               vocab_size_per_layer_input=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _twins(implementation: str):
    config = _gemma4()
    torch.manual_seed(0)
    reference = tf.Gemma4ForCausalLM._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    model = tf.Gemma4ForCausalLM(copy.deepcopy(config)).eval()
    model.load_state_dict(reference.state_dict())
    model.set_attn_implementation(implementation)
    return reference, model


def test_the_global_layer_is_wide():
    _, model = _twins("eager")
    assert [layer.self_attn.head_dim for layer in model.model.layers] == [16, 512]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_forward_equals_eager(implementation, side):
    reference, model = _twins(implementation)
    assert_logits_like_eager(reference, model, *padded_batch(side), f"gemma4 {implementation} {side}-padded")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_greedy_generate_equals_eager(implementation):
    reference, model = _twins(implementation)
    ids, mask = padded_batch("left")
    options = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = reference.generate(ids, **options)
        actual = model.generate(ids, **options)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_int8_cache_generate_equals_eager(implementation):
    """MFAQuantizedCache reads each layer's head dim from the per-layer config (reading config.head_dim of a
    heterogeneous config raises: the cache could not be made for Gemma 4)."""
    from mfa_hf.integrations.transformers import cache_kwargs
    from mfa_hf.integrations.transformers.quantized_cache import MFAQuantizedCache

    reference, model = _twins(implementation)
    ids, mask = padded_batch("left")
    options = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = reference.generate(ids, **options)
        with trace.capture() as calls:
            actual = model.generate(ids, **options, **cache_kwargs(MFAQuantizedCache("int8", config=model.config)))
    assert kernel_calls(calls) >= 2
    assert torch.equal(actual, expected)


def test_nf4_cache_checks_every_layers_head_dim():
    """nf4 groups must divide every layer's head dim: the 16-wide sliding layers fail, said when the cache is made."""
    from mfa_hf.integrations.transformers.quantized_cache import MFAQuantizedCache

    with pytest.raises(ValueError, match=r"head_dim: expected a multiple of the nf4 group size 64 .*got 16"):
        MFAQuantizedCache("nf4", config=_gemma4())
