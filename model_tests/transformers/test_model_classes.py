"""Issue 15 part 3: real model classes that gave silent wrong outputs (or crashed) under "mps_flash" / "mfa".

Each test builds tiny models from configs (no hub), the same weights under eager and under our name
(conftest.twin_models), compares fp32 outputs at transformers' tolerances on the valid positions, and
checks that our kernel ran. Where the right outcome is a refusal, the refusal is asserted instead:
`UnsupportedModelError` naming the model class and suggesting "mfa".

1. Classes whose flash path drops the image-token / prefix mask (Gemma 3 and PaliGemma VLMs; transformers
   marks them `_supports_flash_attn = False` in 5.24/5.25, not in 5.17): "mps_flash" refused at init and at
   set_attn_implementation (also through a per-sub-config dict); "mfa" equal to eager.
2. Encoder-decoders and decoders with cross-attention on right-padded batches (Lq == Lk and Lq != Lk).
3. SigLIP2: up to 5.24 its attention-pooling head reshapes the mask it gets from the mask interface as if
   it were 4-D; "mfa" equal to eager, "mps_flash" refused or equal.
4. Sliding windows the model applies through its mask but not (or differently) through the
   `sliding_window` kwarg of the attention function (T5Gemma's encoder, Qwen2-MoE, PhiMoE).
5. torch.compile(fullgraph=True).
6. output_attentions=True: a warning, and the same `attentions` structure as transformers' own sdpa path.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import pytest
import torch
import transformers as tf
from conftest import IMPLEMENTATIONS, TOLERANCE, assert_close_where, kernel_calls, padded_batch, twin_models
from families import Family

from mfa_hf import trace
from mfa_hf.integrations.transformers import UnsupportedModelError

IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
IMAGE_TOKEN = 127
BATCH = 3


def _close(actual, expected, what):
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCE[torch.float32],
                               msg=lambda m: f"{what}: {m}")


def _ran(calls, at_least, what):
    assert kernel_calls(calls) >= at_least, f"{what}: mfa-hf kernel did not run ({dict(trace.served_by(calls))})"


def _right_padded(batch=BATCH, seq=10, pads=(0, 2, 4), seed=1, vocab=128):
    ids = torch.randint(3, vocab - 4, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        if pad:
            mask[row, seq - pad:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _left_padded(batch=BATCH, seq=10, pads=(0, 2, 4), seed=1, vocab=128):
    ids = torch.randint(3, vocab - 4, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


# -- tiny configs ---------------------------------------------------------------------------------------

def _siglip_vision(**extra):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **extra)


def _gemma3_vlm():
    # 16x16 images in 4x4 patches (a 4x4 grid) pooled to 2x2 = 4 image tokens per image.
    return tf.Gemma3Config(
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                         sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                         max_position_embeddings=256, **IDS),
        vision_config=_siglip_vision(image_size=16, patch_size=4),
        mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN, boi_token_index=125, eoi_token_index=126)


def _paligemma():
    # 16x16 images in 8x8 patches: 4 image tokens; the Gemma backbone gets use_bidirectional_attention=True.
    return tf.PaliGemmaConfig(
        text_config=dict(model_type="gemma", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256, **IDS),
        vision_config=_siglip_vision(image_size=16, patch_size=8),
        image_token_index=IMAGE_TOKEN, projection_dim=64, hidden_size=64, vocab_size=128)


def _siglip2_vision_config():
    return tf.Siglip2VisionConfig(**_siglip_vision(num_patches=16, patch_size=4))


def _siglip2():
    return tf.Siglip2Config(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, **IDS),
        vision_config=_siglip_vision(num_patches=16, patch_size=4))


_BART_LIKE = dict(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                  decoder_start_token_id=1, forced_bos_token_id=None, forced_eos_token_id=None, **IDS)


def _t5gemma(layer_types=("full_attention", "full_attention"), sliding_window=4):
    module = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=sliding_window,
                  layer_types=list(layer_types), max_position_embeddings=64, **IDS)
    return tf.T5GemmaConfig(encoder=dict(module), decoder=dict(module), vocab_size=128)


_SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, **IDS)

SEQ2SEQ = [
    Family("bart", tf.BartForConditionalGeneration, lambda: tf.BartConfig(**_BART_LIKE), kind="seq2seq"),
    Family("mbart", tf.MBartForConditionalGeneration, lambda: tf.MBartConfig(**_BART_LIKE), kind="seq2seq"),
    Family("marian", tf.MarianMTModel, lambda: tf.MarianConfig(**{**_BART_LIKE, "decoder_start_token_id": 0}),
           kind="seq2seq"),
    Family("pegasus", tf.PegasusForConditionalGeneration,
           lambda: tf.PegasusConfig(**{**_BART_LIKE, "decoder_start_token_id": 0}), kind="seq2seq"),
    # Full-attention layers only here: its sliding encoder layers are case 4.
    Family("t5gemma", tf.T5GemmaForConditionalGeneration, _t5gemma, kind="seq2seq"),
]

BERT_DECODER = Family("bert_decoder", tf.BertLMHeadModel, lambda: tf.BertConfig(
    vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=64, pad_token_id=0, is_decoder=True, add_cross_attention=True))

# Window 4 < sequence 12 in every sliding case below.
SLIDING_DECODERS = [
    # Layer 0 sliding (layer_types from use_sliding_window + max_window_layers); the attention layer does not
    # pass `sliding_window` to the attention function, eager gets the window from the mask only.
    Family("qwen2_moe", tf.Qwen2MoeForCausalLM, lambda: tf.Qwen2MoeConfig(
        **_SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=2, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    # Every layer sliding through create_sliding_window_causal_mask; no `sliding_window` kwarg either.
    Family("phimoe", tf.PhimoeForCausalLM, lambda: tf.PhimoeConfig(
        **_SMALL, sliding_window=4, num_local_experts=4, num_experts_per_tok=2)),
]

LLAMA = Family("llama", tf.LlamaForCausalLM, lambda: tf.LlamaConfig(**_SMALL))


def _params(families):
    return [pytest.param(f, id=f.name) for f in families]


# -- 1. classes transformers marks _supports_flash_attn = False -----------------------------------------

# Their flash path drops the image-token / prefix mask on every release (SigLIP2, also marked
# `_supports_flash_attn = False` up to 5.24, is case 3: refused or equal, since 5.25 serves it exactly).
COMPOSITE = {
    "gemma3_conditional_generation": (tf.Gemma3ForConditionalGeneration, _gemma3_vlm),
    "gemma3_model": (tf.Gemma3Model, _gemma3_vlm),
    "paligemma": (tf.PaliGemmaForConditionalGeneration, _paligemma),
}


def _with_sub_config_name(config_fn, name):
    def build():
        config = config_fn()
        config.text_config._attn_implementation = name
        return config
    return build


def _refusal_routes(cls, config_fn, composite):
    routes = {
        "set_attn_implementation": lambda: cls(config_fn()).set_attn_implementation("mps_flash"),
        "from_config": lambda: cls._from_config(config_fn(), attn_implementation="mps_flash"),
    }
    if composite:
        routes.update({
            "set_attn_implementation_text_config_dict":
                lambda: cls(config_fn()).set_attn_implementation({"text_config": "mps_flash"}),
            "from_config_text_config_dict":
                lambda: cls._from_config(config_fn(), attn_implementation={"text_config": "mps_flash"}),
            "init_with_text_config_set": lambda: cls(_with_sub_config_name(config_fn, "mps_flash")()),
        })
    return routes


REFUSALS = [pytest.param(cls, route, id=f"{name}-{route}")
            for name, (cls, config_fn) in COMPOSITE.items()
            for route in _refusal_routes(cls, config_fn, composite=True)]
CONFIG_OF = {cls: config_fn for cls, config_fn in COMPOSITE.values()}


@pytest.mark.parametrize("cls, route", REFUSALS)
def test_mps_flash_refused_on_classes_without_flash_support(cls, route):
    """The flash path drops these classes' image/prefix mask (the FA mask is at most the 2-D padding), so
    "mps_flash" must be refused on every route a user can take, naming the class and "mfa". transformers
    marks them `_supports_flash_attn = False` in 5.24/5.25 but True in 5.17, so the refusal must not depend
    on that marking (test_mps_flash_refused_or_equal_with_image_masks shows why)."""
    build = _refusal_routes(cls, CONFIG_OF[cls], composite=True)[route]
    with pytest.raises(UnsupportedModelError, match=rf"{cls.__name__}.*\"mfa\""):
        build()


def _gemma3_inputs():
    """Right-padded text with one 4-token image per row; token_type_ids mark the image tokens."""
    ids, mask = _right_padded(seq=12, pads=(0, 2, 3), vocab=124)
    ids[:, 2] = 125
    ids[:, 3:7] = IMAGE_TOKEN
    ids[:, 7] = 126
    token_type_ids = (ids == IMAGE_TOKEN).long()
    pixels = torch.randn(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=token_type_ids, pixel_values=pixels), mask


def _paligemma_inputs(token_type_ids=True, padded=True):
    """[4 image tokens | prompt prefix | suffix], right padding inside the suffix; token_type_ids 0 on the
    prefix (image + prompt: bidirectional), 1 on the suffix (causal), as the processor builds them in training."""
    ids, mask = _right_padded(seq=12, pads=(0, 2, 3) if padded else (0, 0, 0), vocab=124)
    ids[:, :4] = IMAGE_TOKEN
    inputs = dict(input_ids=ids, attention_mask=mask,
                  pixel_values=torch.randn(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(3)))
    if token_type_ids:
        types = torch.zeros_like(ids)
        types[:, 7:] = 1
        inputs["token_type_ids"] = types
    return inputs, mask


VLM_CASES = {
    # name: (family, inputs, training)
    "gemma3_image_tokens": (Family("gemma3_vlm", tf.Gemma3ForConditionalGeneration, _gemma3_vlm), _gemma3_inputs,
                            False),
    "paligemma_train_prefix_suffix": (Family("paligemma", tf.PaliGemmaForConditionalGeneration, _paligemma),
                                      _paligemma_inputs, True),
    "paligemma_eval_prefix_suffix": (Family("paligemma", tf.PaliGemmaForConditionalGeneration, _paligemma),
                                     _paligemma_inputs, False),
    # No token_type_ids: eager's mask is plain causal, while the Gemma backbone's layers say is_causal=False
    # (PaliGemmaConfig sets use_bidirectional_attention=True).
    "paligemma_no_token_type_ids_padded": (Family("paligemma", tf.PaliGemmaForConditionalGeneration, _paligemma),
                                           lambda: _paligemma_inputs(token_type_ids=False), False),
    "paligemma_no_token_type_ids_unpadded": (Family("paligemma", tf.PaliGemmaForConditionalGeneration, _paligemma),
                                             lambda: _paligemma_inputs(token_type_ids=False, padded=False), False),
}


@pytest.mark.parametrize("case", list(VLM_CASES))
def test_mfa_equals_eager_on_classes_without_flash_support(case):
    family, make_inputs, training = VLM_CASES[case]
    _assert_vlm_equals_eager(*twin_models(family, "mfa"), case, f"{case} logits")


def _assert_vlm_equals_eager(reference, model, case, what):
    _, make_inputs, training = VLM_CASES[case]
    reference.train(training)
    model.train(training)
    inputs, mask = make_inputs()
    with torch.no_grad():
        expected = reference(**inputs).logits
        with trace.capture() as calls:
            actual = model(**inputs).logits
    _ran(calls, 4, case)  # vision tower + language model
    assert_close_where(actual, expected, mask, what=what)


@pytest.mark.parametrize("case", ["gemma3_image_tokens", "paligemma_train_prefix_suffix",
                                  "paligemma_eval_prefix_suffix"])
def test_mps_flash_refused_or_equal_with_image_masks(case):
    """Whatever transformers' marking says, "mps_flash" on these inputs is refused (naming the class and "mfa")
    or equal to eager; accepted-and-different is the silent wrong output of issue 15."""
    family = VLM_CASES[case][0]
    try:
        reference, model = twin_models(family, "mps_flash")
    except UnsupportedModelError as error:
        assert family.model_cls.__name__ in str(error) and '"mfa"' in str(error), str(error)
        return
    _assert_vlm_equals_eager(reference, model, case, f"{case} logits under mps_flash (accepted, so it must be exact)")


@pytest.mark.parametrize("case", ["gemma3_image_tokens", "paligemma_train_prefix_suffix"])
def test_image_mask_matters_in_these_inputs(case):
    """Guard for the test above: dropping token_type_ids changes eager's logits, so the bidirectional
    image/prefix mask is really exercised."""
    family, make_inputs, training = VLM_CASES[case]
    reference, _ = twin_models(family, "eager")
    reference.train(training)
    inputs, mask = make_inputs()
    without = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    with torch.no_grad():
        assert not torch.allclose(reference(**inputs).logits[mask.bool()], reference(**without).logits[mask.bool()],
                                  atol=1e-4)


# -- 2. cross-attention on right-padded batches -----------------------------------------------------------

@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("decoder_len", [6, 10], ids=["Lq_ne_Lk", "Lq_eq_Lk"])
@pytest.mark.parametrize("family", _params(SEQ2SEQ))
def test_seq2seq_right_padded_forward(family, decoder_len, implementation):
    """Encoder batch right-padded (10 tokens, rows padded by 0/2/4), decoder batch right-padded too
    (row 2 by 2); logits compared on the valid decoder positions."""
    _model, calls = _seq2seq_right_padded_equal(family, implementation, 10, decoder_len)
    _ran(calls, 6, family.name)  # encoder self, decoder self, cross


def _seq2seq_right_padded_equal(family, implementation, encoder_len, decoder_len):
    """Both batches right-padded; encoder states and logits equal eager's on the valid positions. Returns the model
    and the trace of its forward."""
    reference, model = twin_models(family, implementation)
    ids, mask = _right_padded(seq=encoder_len)
    decoder_ids, decoder_mask = _right_padded(seq=decoder_len, pads=(0, 0, 2), seed=2)
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                  decoder_attention_mask=decoder_mask)
    with torch.no_grad():
        expected = reference(**inputs)
        with trace.capture() as calls:
            actual = model(**inputs)
    assert_close_where(actual.encoder_last_hidden_state, expected.encoder_last_hidden_state, mask,
                       what=f"{family.name} encoder")
    assert_close_where(actual.logits, expected.logits, decoder_mask, what=f"{family.name} logits")
    return model, calls


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", _params(SEQ2SEQ))
def test_seq2seq_right_padded_greedy_generate(family, implementation):
    reference, model = twin_models(family, implementation)
    ids, mask = _right_padded(seq=10)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    expected = reference.generate(**kwargs)
    with trace.capture() as calls:
        actual = model.generate(**kwargs)
    _ran(calls, 6, family.name)
    assert torch.equal(actual, expected), f"{family.name}: {actual.tolist()} != {expected.tolist()}"


PEGASUS_X = Family("pegasus_x", tf.PegasusXForConditionalGeneration, lambda: tf.PegasusXConfig(
    **{**_BART_LIKE, "decoder_start_token_id": 0}, block_size=4, num_global_tokens=2), kind="seq2seq")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_pegasus_x_serves_the_decoder_and_leaves_the_inline_encoder(implementation):
    """PegasusX's block-local encoder attention computes inline in transformers (unsupported.INLINE_ENCODER_ATTENTION):
    our kernel serves the decoder's self- and cross-attention only, and the model equals eager with padding."""
    model, calls = _seq2seq_right_padded_equal(PEGASUS_X, implementation, 12, 6)
    assert kernel_calls(calls) == 2 * model.config.decoder_layers, trace.served_by(calls)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("decoder_len", [6, 10, 14], ids=["Lq_lt_Lk", "Lq_eq_Lk", "Lq_gt_Lk"])
def test_bert_decoder_cross_attention_right_padded(decoder_len, implementation):
    """BertLMHeadModel(is_decoder, add_cross_attention) with padded encoder_hidden_states (10 positions,
    rows padded by 0/2/4) and a right-padded decoder batch."""
    reference, model = twin_models(BERT_DECODER, implementation)
    encoder_states = torch.randn(BATCH, 10, 32, generator=torch.Generator().manual_seed(4))
    encoder_mask = _right_padded(seq=10)[1]
    ids, mask = _right_padded(seq=decoder_len, pads=(0, 1, 2), seed=2)
    inputs = dict(input_ids=ids, attention_mask=mask, encoder_hidden_states=encoder_states,
                  encoder_attention_mask=encoder_mask)
    with torch.no_grad():
        expected = reference(**inputs).logits
        with trace.capture() as calls:
            actual = model(**inputs).logits
    _ran(calls, 4, "bert decoder")  # self + cross per layer
    assert_close_where(actual, expected, mask, what="bert decoder logits")


# -- 3. SigLIP2: attention-pooling head fed by the mask interface ------------------------------------------

SIGLIP2_PATCHES = 12
SIGLIP2_SHAPES = {"padded_patches": [[3, 4], [2, 4], [2, 3]], "no_padding": [[3, 4], [3, 4], [3, 4]]}
SIGLIP2 = {"siglip2_vision_model": Family("siglip2_vision", tf.Siglip2VisionModel, _siglip2_vision_config),
           "siglip2_model": Family("siglip2", tf.Siglip2Model, _siglip2)}


def _siglip2_inputs(layout):
    shapes = torch.tensor(SIGLIP2_SHAPES[layout])
    mask = torch.zeros(BATCH, SIGLIP2_PATCHES, dtype=torch.long)
    for row, (h, w) in enumerate(shapes.tolist()):
        mask[row, : h * w] = 1
    pixels = torch.randn(BATCH, SIGLIP2_PATCHES, 3 * 4 * 4, generator=torch.Generator().manual_seed(5))
    return dict(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes), mask


def _siglip2_compare(name, reference, model, layout):
    inputs, mask = _siglip2_inputs(layout)
    if name == "siglip2_model":
        inputs["input_ids"] = torch.randint(3, 128, (BATCH, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = reference(**inputs)
        with trace.capture() as calls:
            actual = model(**inputs)
    _ran(calls, 2, name)
    if name == "siglip2_model":
        assert_close_where(actual.vision_model_output.last_hidden_state,
                           expected.vision_model_output.last_hidden_state, mask, what="vision last_hidden_state")
        _close(actual.vision_model_output.pooler_output, expected.vision_model_output.pooler_output,
               "vision pooler_output")
        _close(actual.image_embeds, expected.image_embeds, "image_embeds")
        _close(actual.text_embeds, expected.text_embeds, "text_embeds")
    else:
        assert_close_where(actual.last_hidden_state, expected.last_hidden_state, mask, what="last_hidden_state")
        _close(actual.pooler_output, expected.pooler_output, "pooler_output")


@pytest.mark.parametrize("layout", list(SIGLIP2_SHAPES))
@pytest.mark.parametrize("name", list(SIGLIP2))
def test_siglip2_mfa_pooling_head(name, layout):
    reference, model = twin_models(SIGLIP2[name], "mfa")
    _siglip2_compare(name, reference, model, layout)


@pytest.mark.parametrize("name", list(SIGLIP2))
def test_siglip2_mps_flash_refused_or_equal(name):
    """Siglip2 has _supports_flash_attn = False: "mps_flash" is either refused (naming the class and "mfa")
    or, if ever accepted, must equal eager with padded patches."""
    family = SIGLIP2[name]
    try:
        reference, model = twin_models(family, "mps_flash")
    except UnsupportedModelError as error:
        assert family.model_cls.__name__ in str(error) and '"mfa"' in str(error), str(error)
        return
    _siglip2_compare(name, reference, model, "padded_patches")


# -- 4. sliding windows ------------------------------------------------------------------------------------

T5GEMMA_SLIDING = Family("t5gemma_sliding", tf.T5GemmaForConditionalGeneration,
                         lambda: _t5gemma(layer_types=("sliding_attention", "full_attention")), kind="seq2seq")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("padding", ["unpadded", "right_padded"])
def test_t5gemma_encoder_sliding_window(padding, implementation):
    """T5Gemma's encoder: layer 0 is a bidirectional sliding layer (window 4, 12 tokens). Its mask is
    |q - k| <= sliding_window while the layer passes sliding_window unchanged to the attention function
    (ModernBERT passes its half-window + 1 for the same mask)."""
    reference, model = twin_models(T5GEMMA_SLIDING, implementation)
    ids, mask = _right_padded(seq=12, pads=(0, 2, 4) if padding == "right_padded" else (0, 0, 0))
    decoder_ids = _right_padded(seq=6, pads=(0, 0, 0), seed=2)[0]
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    with torch.no_grad():
        expected = reference(**inputs)
        with trace.capture() as calls:
            actual = model(**inputs)
    _ran(calls, 6, "t5gemma")
    assert_close_where(actual.encoder_last_hidden_state, expected.encoder_last_hidden_state, mask,
                       what="t5gemma encoder")
    _close(actual.logits, expected.logits, "t5gemma logits")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("padding", ["unpadded", "left_padded", "right_padded"])
@pytest.mark.parametrize("family", _params(SLIDING_DECODERS))
def test_moe_sliding_window_longer_sequence(family, padding, implementation):
    reference, model = twin_models(family, implementation)
    make = _left_padded if padding == "left_padded" else _right_padded
    ids, mask = make(seq=12, pads=(0, 0, 0) if padding == "unpadded" else (0, 2, 4))
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        with trace.capture() as calls:
            actual = model(ids, attention_mask=mask).logits
    _ran(calls, 2, family.name)
    assert_close_where(actual, expected, mask, what=f"{family.name} logits")


def test_moe_sliding_window_matters_in_eager():
    """Guard: eager applies the window for both (without it the logits differ), so the tests above test it."""
    for family in SLIDING_DECODERS:
        windowed, _ = twin_models(family, "eager")
        config = family.config()
        config.sliding_window = None if family.name == "phimoe" else 0
        if family.name == "qwen2_moe":
            config.layer_types = ["full_attention", "full_attention"]
        full = family.model_cls(config).eval()
        full.load_state_dict(windowed.state_dict())
        full.set_attn_implementation("eager")
        ids = _right_padded(seq=12, pads=(0, 0, 0))[0]
        with torch.no_grad():
            assert not torch.allclose(windowed(ids).logits, full(ids).logits, atol=1e-4), family.name


# -- 5. torch.compile ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("padding", ["no_mask", "left_padded"])
def test_torch_compile_fullgraph(padding, implementation, monkeypatch):
    # our kernels, not the native route: a compiled graph's calls of our op are what the trace counts (trace.py)
    monkeypatch.setenv("MFA_BACKEND", "torch")
    reference, model = twin_models(LLAMA, implementation)
    ids, mask = _left_padded(seq=10)
    attention_mask = mask if padding == "left_padded" else None
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        expected = reference(ids, attention_mask=attention_mask, use_cache=False).logits
        with trace.capture() as calls:
            actual = compiled(ids, attention_mask=attention_mask, use_cache=False).logits
    _ran(calls, 2, "compiled llama")
    assert_close_where(actual, expected, mask if attention_mask is not None else torch.ones_like(ids),
                       what="compiled llama logits")


# -- 6. output_attentions=True --------------------------------------------------------------------------------

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextmanager
def _all_warnings():
    """Every message from warnings.warn and from loggers (transformers' root logger does not propagate)."""
    from transformers.utils import logging as tf_logging

    tf_logging.warning_once.cache_clear()  # logger.warning_once: one message per process otherwise
    records = _Records()
    loggers = [logging.getLogger(), logging.getLogger("transformers")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records.messages
            records.messages.extend(str(w.message) for w in caught)
    finally:
        for logger in loggers:
            logger.removeHandler(records)


_ABSENT = object()


def _attention_fields(outputs):
    fields = {}
    for key in ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions"):
        value = getattr(outputs, key, _ABSENT)
        if value is not _ABSENT:
            fields[key] = None if value is None else tuple(None if a is None else tuple(a.shape) for a in value)
    return fields


OUTPUT_ATTENTIONS = [
    LLAMA,
    Family("bert", tf.BertModel, lambda: tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, intermediate_size=64, pad_token_id=0),
           kind="encoder"),
    SEQ2SEQ[0],  # bart: encoder, decoder and cross attentions
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", _params(OUTPUT_ATTENTIONS))
def test_output_attentions_warns_and_matches_sdpa(family, implementation):
    sdpa, model = twin_models(family, implementation)
    sdpa.set_attn_implementation("sdpa")
    ids, mask = _right_padded(seq=8)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if family.kind == "seq2seq":
        inputs["decoder_input_ids"] = _right_padded(seq=5, pads=(0, 0, 0), seed=2)[0]
    with torch.no_grad():
        expected = sdpa(**inputs, output_attentions=True)
        with _all_warnings() as messages, trace.capture() as calls:
            actual = model(**inputs, output_attentions=True)
    _ran(calls, 2, family.name)
    assert _attention_fields(actual) == _attention_fields(expected)
    assert any("output_attentions" in m for m in messages), f"no warning mentions output_attentions: {messages}"


def _tiny(model_type: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0)


def test_model_that_consumes_the_mask_gets_it_materialized():
    """Doge adds a dynamic mask onto the causal one and asks its builder for a materialized mask
    (allow_is_causal_skip=False): a compact key mask would lose causality there."""
    family = Family("doge", tf.DogeForCausalLM, lambda: _tiny("doge"))
    reference, model = twin_models(family, "mfa")
    ids, mask = padded_batch("left")
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        with trace.capture() as calls:
            actual = model(ids, attention_mask=mask).logits
    _ran(calls, 2, "doge")
    assert_close_where(actual, expected, mask, what="doge logits")


def test_per_token_sinks_are_refused_not_dropped():
    """Inkling2 passes `sinks` of shape (B, H, Lq, 1); dropping them would silently change the output."""
    cls = getattr(tf, "Inkling2ForCausalLM", None)
    if cls is None:
        pytest.skip("Inkling2 is not in this transformers release")
    from mfa_hf.integrations.transformers import internals

    if internals.supports_only_eager(cls):  # refused earlier, at init, with every other eager-only class
        with pytest.raises(UnsupportedModelError, match=r"Inkling2ForCausalLM supports only eager"):
            cls._from_config(_tiny("inkling2_text"), attn_implementation="mfa")
        return
    model = cls._from_config(_tiny("inkling2_text"), attn_implementation="mfa").eval()
    with pytest.raises(NotImplementedError, match=r"Inkling2\w*Attention: .*sinks of shape"):
        with torch.no_grad():
            model(padded_batch("left")[0])


# -- 7. mask patterns that are unions (or_masks) ---------------------------------------------------------

def _gemma3_bidirectional(layer_types):
    return tf.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                               max_position_embeddings=256, sliding_window=4, layer_types=layer_types,
                               use_bidirectional_attention=True, **IDS)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("side", ["left", "right", "none"])
@pytest.mark.parametrize("layer_types", [("sliding_attention", "full_attention"), ("sliding_attention",) * 2],
                         ids=["sliding+full", "sliding"])
def test_union_mask_patterns_equal_eager(layer_types, side, implementation):
    """EmbeddingGemma-style Gemma 3 (use_bidirectional_attention): its masks are or_masks unions (a causal
    window OR |q - kv| < w; causal OR everything), which no causal/window flag or tag carries. Under
    "mps_flash" the sliding layers lost their window (3.8 off eager); every name must apply them exactly."""
    family = Family("gemma3_bidirectional", tf.Gemma3TextModel, lambda: _gemma3_bidirectional(list(layer_types)))
    reference, model = twin_models(family, implementation)
    make = {"left": _left_padded, "right": _right_padded}.get(side)
    ids, mask = make(seq=12, pads=(0, 2, 5)) if make else _left_padded(seq=12, pads=(0, 0, 0))
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).last_hidden_state
        with trace.capture() as calls:
            actual = model(ids, attention_mask=mask).last_hidden_state
    _ran(calls, 2, "gemma3 bidirectional")
    assert_close_where(actual, expected, mask, what=f"gemma3 bidirectional {side}-padded hidden states")


def test_union_mask_pattern_matters_in_that_test():
    """Guard: the window is shorter than the sequence, so the bidirectional window differs from full attention."""
    family = Family("gemma3_bidirectional", tf.Gemma3TextModel,
                    lambda: _gemma3_bidirectional(["sliding_attention", "full_attention"]))
    windowed, _ = twin_models(family, "eager")
    unwindowed = Family("gemma3_full", tf.Gemma3TextModel,
                        lambda: _gemma3_bidirectional(["full_attention", "full_attention"]))
    full, _ = twin_models(unwindowed, "eager")
    full.load_state_dict(windowed.state_dict())
    ids, mask = _left_padded(seq=12, pads=(0, 0, 0))
    with torch.no_grad():
        assert not torch.allclose(windowed(ids).last_hidden_state, full(ids).last_hidden_state, atol=1e-3)


def _minimax():
    return tf.MiniMaxConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            layer_types=["linear_attention", "full_attention"], num_local_experts=2,
                            num_experts_per_tok=1, block_size=4, max_position_embeddings=128, **IDS)


def test_a_mask_built_for_other_keys_is_refused_not_misread():
    """MiniMax's cache gives its full-attention layers a mask of 1 key at decode steps (the sizes of its linear
    layers). Read as key validity it hid every cached key of every row from "mfa" (1.2e-2 off on an unpadded row);
    eager broadcasts it, wrong on padded rows. Padded batches are refused naming the mismatch; unpadded ones equal
    eager."""
    if not hasattr(tf, "MiniMaxForCausalLM"):
        pytest.skip("MiniMax is not in this transformers release")
    family = Family("minimax", tf.MiniMaxForCausalLM, _minimax)
    reference, model = twin_models(family, "mfa")
    ids, mask = _left_padded(batch=2, seq=10, pads=(0, 3))
    kwargs = dict(max_new_tokens=4, do_sample=False)
    with pytest.raises(NotImplementedError, match=r"MiniMaxAttention: attention_mask was built for 1 keys but this "
                                                  r"layer attends over 11"):
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, **kwargs)
    unpadded = torch.ones_like(mask)
    with torch.no_grad():
        expected = reference.generate(ids, attention_mask=unpadded, **kwargs)
        with trace.capture() as calls:
            actual = model.generate(ids, attention_mask=unpadded, **kwargs)
    _ran(calls, 1, "minimax")
    assert torch.equal(actual, expected)


def test_minimax_padded_under_mps_flash_equals_each_row_alone():
    """Under "mps_flash" transformers hands the layers the 2-D padding mask itself, not MiniMax's 1-key 4-D one, so
    a padded batch is served: each row's tokens equal that row generated alone, unpadded (the truth eager's
    broadcast misses on padded rows)."""
    if not hasattr(tf, "MiniMaxForCausalLM"):
        pytest.skip("MiniMax is not in this transformers release")
    reference, model = twin_models(Family("minimax", tf.MiniMaxForCausalLM, _minimax), "mps_flash")
    pads = (0, 3)
    ids, mask = _left_padded(batch=2, seq=10, pads=pads)
    kwargs = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        with trace.capture() as calls:
            batched = model.generate(ids, attention_mask=mask, **kwargs)
        for row, pad in enumerate(pads):
            alone = ids[row:row + 1, pad:]
            expected = reference.generate(alone, attention_mask=torch.ones_like(alone), **kwargs)
            assert torch.equal(batched[row, pad:], expected[0]), f"row {row}"
    _ran(calls, 1, "minimax")
