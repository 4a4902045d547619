"""Models whose own code reads the attention mask outside attention, under "mfa": equal to eager.

- Sparse-attention (DSA) models (DeepSeek-V3.2, GLM-MoE-DSA, AXK2, dots3, MiniMax-M3-VL, ...): an indexer takes
  the top-k keys by its own scores over the keys the mask leaves visible, and for implementations other than
  eager/sdpa passes them to the attention function as `indices=` instead of folding them into the mask. Both
  were dropped: the indexer got a compact key-validity mask (its top-k then chose future keys) and the indices
  were ignored (every visible key attended): 0.08-0.23 off eager on every batch, padded or not, whenever the
  sequence was longer than index_topk (2048 in the real configs).
- Doge adds its dynamic mask onto the mask; under a static cache a decode step's compact mask (the filled keys)
  did not fit its scores over the whole buffer (a RuntimeError inside the model).

The class is found by config (an indexer: `index_topk`) or model type (masks.consumes_mask); such models get the
dense mask eager gets at every query length. Each model that this transformers release has is tested with
index_topk 4 (shorter than the sequence, so the selection matters: see the guard test).
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import TOLERANCE, assert_logits_like_eager, kernel_calls, padded_batch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from mfa_hf import trace
from mfa_hf.integrations.transformers import attention, masks

# Small enough for every MLA/indexer config below (kv_lora_rank, rope/nope split, indexer heads, experts).
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, head_dim=16, kv_lora_rank=16, q_lora_rank=24,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, index_topk=4, index_head_dim=16, index_n_heads=2,
            n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
            keep_window_size=4, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODEL_TYPES = ["deepseek_v32", "glm_moe_dsa", "axk2", "dots3_note_text", "minimax_m3_vl_text", "doge"]


def _config(model_type: str, **changes):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"{model_type} is not in transformers {tf.__version__}")
    return AutoConfig.for_model(model_type, **{**TINY, **changes})


def _twins(model_type: str, **changes):
    """(eager reference, the same weights under "mfa")."""
    config = _config(model_type, **changes)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model = AutoModelForCausalLM.from_config(_config(model_type, **changes)).eval()
    model.load_state_dict(reference.state_dict())
    model.set_attn_implementation("mfa")
    return reference, model


@pytest.mark.parametrize("side", ["left", "right", "none"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_forward_equals_eager(model_type, side):
    reference, model = _twins(model_type)
    ids, mask = padded_batch("left" if side == "none" else side)
    if side == "none":
        mask = torch.ones_like(mask)
    assert_logits_like_eager(reference, model, ids, mask, f"{model_type} {side}-padded")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_greedy_generate_equals_eager(model_type, cache):
    """Decode steps too: the indexer's top-k over a growing cache, and a static cache's whole buffer."""
    reference, model = _twins(model_type)
    ids, mask = padded_batch("left")
    options = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    if cache == "static":
        options["cache_implementation"] = "static"
    with torch.no_grad():
        expected = reference.generate(ids, **options)
        with trace.capture() as calls:
            actual = model.generate(ids, **options)
    assert kernel_calls(calls) >= 2, f"{model_type}: mfa-hf kernel did not run"
    assert torch.equal(actual, expected), f"{model_type} {cache} cache: {actual[:, ids.shape[1]:].tolist()} vs " \
                                          f"eager {expected[:, ids.shape[1]:].tolist()}"


@pytest.mark.parametrize("model_type", ["deepseek_v32", "glm_moe_dsa"])
def test_the_selection_matters_in_these_tests(model_type):
    """Guard: with index_topk 4 of 10 keys, eager differs from the same weights selecting every key."""
    sparse, _ = _twins(model_type)
    dense, _ = _twins(model_type, index_topk=64)
    dense.load_state_dict(sparse.state_dict())
    ids, mask = padded_batch("left")
    with torch.no_grad():
        apart = (sparse(ids, attention_mask=mask).logits - dense(ids, attention_mask=mask).logits)[mask.bool()]
    assert apart.abs().max() > 1e-3


def test_the_class_is_found_by_config():
    assert masks.consumes_mask(_config("deepseek_v32"))
    assert masks.consumes_mask(tf.LlamaConfig(index_topk=8))  # any config with an indexer
    assert masks.consumes_mask(tf.DogeConfig())
    assert not masks.consumes_mask(tf.LlamaConfig())
    assert not masks.consumes_mask(None)


class _Layer(torch.nn.Module):
    is_causal = True


def _qkv(batch=2, heads=2, q_len=5, keys=5, dim=8):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, heads, n, dim, generator=generator) for n in (q_len, keys, keys)]


@pytest.mark.parametrize("mask_batch", [2, 1], ids=["per-row mask", "broadcast mask"])
@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
def test_indices_restrict_the_dense_mask_like_eager(additive, mask_batch):
    """The attention function alone: indices (B, Lq, k) leave only the selected keys of the dense mask visible,
    as eager's folded mask does (an additive mask takes dtype min, the models' own fill)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    q, k, v = _qkv()
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5)
    indices = torch.tensor([[0, 1], [1, 0], [2, 0], [3, 1], [4, 2]]).expand(2, 5, 2).clone()
    indices[1, 4] = torch.tensor([3, 0])
    chosen = torch.zeros(2, 1, 5, 5, dtype=torch.bool).scatter(-1, indices[:, None], True)
    minimum = torch.finfo(torch.float32).min
    folded = causal & chosen
    mask = torch.zeros(2, 1, 5, 5).masked_fill(~causal, minimum) if additive else causal
    mask = mask[:mask_batch]
    expected_mask = torch.zeros(2, 1, 5, 5).masked_fill(~folded, minimum)  # eager adds its mask
    layer = _Layer()
    layer.num_key_value_groups, layer.training = 1, False
    expected, _ = eager_attention_forward(layer, q, k, v, expected_mask, scaling=8 ** -0.5)
    actual, _ = attention.mfa_attention_forward(layer, q, k, v, mask, scaling=8 ** -0.5, indices=indices)
    torch.testing.assert_close(actual, expected, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("mask", [None, torch.ones(2, 5, dtype=torch.bool)], ids=["no mask", "key mask"])
def test_indices_without_a_dense_mask_are_refused(mask):
    """Indices chosen over a compact mask (a model whose config does not show its indexer) cannot be trusted:
    refused naming the model's layer and the alternatives, never applied or dropped silently."""
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match=r"_Layer: the model passes sparse top-k key indices .*"
                                                  r"eager.* or .*sdpa"):
        attention.mfa_attention_forward(_Layer(), q, k, v, mask, indices=torch.zeros(2, 5, 2, dtype=torch.long))


def test_malformed_indices_are_refused():
    q, k, v = _qkv()
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"indices: expected integer top-k key indices \(B, 5, k\), got a "
                                         r"torch.float32 tensor of shape \(2, 5, 2\)"):
        attention.mfa_attention_forward(_Layer(), q, k, v, mask, indices=torch.zeros(2, 5, 2))


@pytest.mark.parametrize("model_type", ["doge", "minimax_m3_vl_text"])
def test_the_quantized_cache_refuses_them_up_front(model_type):
    """Their decode steps need the dense mask (an arbitrary top-k of keys, not key padding) and Doge reads its
    cached values as tensors: refused when the cache is made, not mid-generate (a NotImplementedError for the
    mask, or a QuantizedCacheError on `.transpose`, after the prefill had run)."""
    from mfa_hf.integrations.transformers.quantized_cache import MFAQuantizedCache

    config = _config(model_type, kv_lora_rank=None, q_lora_rank=None)
    with pytest.raises(ValueError, match=rf"MFAQuantizedCache: model_type '{model_type}' reads the attention mask in "
                                         r"its own code .* Use the default DynamicCache"):
        MFAQuantizedCache("int8", config=config)
