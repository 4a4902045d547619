"""How users reach the kernels: every entry point for both names, the FA-flavour provider hook, the
lazy import hook, packed sequences, and the refusal of legacy models (the release policy and the
contract probe: test_release_policy.py)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import transformers as tf
from conftest import BATCH, IMPLEMENTATIONS, assert_close_where, kernel_calls, padded_batch, twin_models
from families import BY_NAME, DECODERS

from mfa_hf import trace
from mfa_hf.integrations.transformers import UnsupportedModelError, fa_surface, internals


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_from_pretrained_and_from_config(tmp_path, implementation):
    config = BY_NAME["llama"].config()
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=implementation)
    built = tf.AutoModelForCausalLM.from_config(BY_NAME["llama"].config(), attn_implementation=implementation)
    ids = padded_batch("left")[0]
    for model in (loaded, built):
        assert model.config._attn_implementation == implementation
        with trace.capture() as calls, torch.no_grad():
            model(ids)
        assert kernel_calls(calls) >= 2


def test_per_subconfig_dict_routes_only_the_named_tower():
    model = tf.CLIPModel(BY_NAME["clip"].config()).eval()
    model.set_attn_implementation({"text_config": "mps_flash", "vision_config": "eager"})
    with torch.no_grad(), trace.capture() as text_calls:
        model.get_text_features(input_ids=padded_batch("right")[0])
    with torch.no_grad(), trace.capture() as vision_calls:
        model.get_image_features(pixel_values=torch.randn(1, 3, 32, 32))
    assert kernel_calls(text_calls) == 2 and kernel_calls(vision_calls) == 0


def test_mps_flash_is_a_flash_flavour_served_by_mfa():
    """transformers treats the name as FlashAttention and loads its functions from us."""
    from transformers.modeling_flash_attention_utils import lazy_import_flash_attention
    from transformers.utils.generic import is_flash_attention_requested

    from mfa_hf.integrations.transformers import fa_surface

    assert is_flash_attention_requested(requested_attention_implementation="mps_flash")
    (flash_fn, varlen_fn, *_), _ = lazy_import_flash_attention("mps_flash")
    assert flash_fn is fa_surface.flash_attn_func and varlen_fn is fa_surface.flash_attn_varlen_func


def test_other_flash_names_still_reach_transformers_loader():
    from transformers.modeling_flash_attention_utils import _lazy_imports

    with pytest.raises((ValueError, ImportError)):
        _lazy_imports("not-a-provider-flash")


def test_uninstall_restores_transformers_and_reinstall_works():
    from transformers import modeling_flash_attention_utils as mfu

    wrapped = mfu._lazy_imports
    internals.uninstall_flash_provider("mps_flash")
    try:
        assert mfu._lazy_imports is not wrapped and not hasattr(mfu, "_mfa_original_lazy_imports")
    finally:
        internals.install_flash_provider("mps_flash", fa_surface.surface)
    assert hasattr(mfu, "_mfa_original_lazy_imports")


def test_import_mfa_hf_does_not_import_transformers_but_registers_when_it_is():
    code = ("import sys, mfa_hf; assert 'transformers' not in sys.modules, 'eager import';"
            "from transformers import LlamaForCausalLM;"
            "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as A;"
            "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as M;"
            "assert {'mps_flash','mfa'} <= set(A.valid_keys()) and {'mps_flash','mfa'} <= set(M.valid_keys())")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", [f.name for f in DECODERS])
def test_packed_sequences(name, implementation):
    """DataCollatorWithFlattening's batch (cu_seq_lens kwargs + restarting position_ids).

    mps_flash is a FlashAttention flavour: it reads cu_seq_lens, so packed logits equal each sequence run
    alone, as with flash_attention_2. mfa stands in for sdpa/eager: it must equal eager on the packed
    batch (eager separates packed sequences where the model's mask does, e.g. Llama; OPT and GPT-OSS
    mix them in eager, and so does mfa)."""
    reference, model = twin_models(BY_NAME[name], implementation)
    lengths = (5, 3, 7)
    seqs = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]
    batch = tf.DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": s} for s in seqs])
    batch.pop("labels", None)
    with torch.no_grad(), trace.capture() as calls:
        packed = model(**batch, use_cache=False).logits[0]
    with torch.no_grad():
        if implementation == "mps_flash":
            expected = torch.cat([reference(torch.tensor([s])).logits[0] for s in seqs])
        else:
            expected = reference(**batch, use_cache=False).logits[0]
    assert kernel_calls(calls) >= 2
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-4)


LEGACY = {
    "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1,
                                                           num_attention_heads=4)),
    "gptj": lambda: tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=128, n_embd=64, n_layer=1, n_head=4, rotary_dim=8)),
    "gpt_neo": lambda: tf.GPTNeoForCausalLM(tf.GPTNeoConfig(vocab_size=128, hidden_size=64, num_layers=1,
                                                            num_heads=4, attention_types=[[["global"], 1]])),
    "bloom": lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=128, hidden_size=64, n_layer=1, n_head=4)),
    "mpt": lambda: tf.MptForCausalLM(tf.MptConfig(vocab_size=128, d_model=64, n_layers=1, n_heads=4)),
    "codegen": lambda: tf.CodeGenForCausalLM(tf.CodeGenConfig(vocab_size=128, n_embd=64, n_layer=1, n_head=4,
                                                              rotary_dim=8)),
    "git": lambda: tf.GitForCausalLM(tf.GitConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1,
                                                  num_attention_heads=4, intermediate_size=128,
                                                  vision_config=dict(hidden_size=32, intermediate_size=64,
                                                                     num_hidden_layers=1, num_attention_heads=4,
                                                                     image_size=32, patch_size=8))),
    # The vision encoder picks its attention class from a table keyed by name: "mfa" was a KeyError inside.
    "sam": lambda: tf.SamModel(tf.SamConfig(
        vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16, mlp_dim=64, global_attn_indexes=[1], window_size=2),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16),
        mask_decoder_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                                 iou_head_hidden_dim=16))),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", sorted(LEGACY))
def test_legacy_models_refuse_while_they_compute_attention_inline(name, implementation):
    """A legacy port is refused, naming the model, while its modeling file does not call the AttentionInterface
    (GPT-Neo, Bloom, MPT; Falcon, GPT-J, CodeGen before 5.25; GIT always: it picks its attention class by
    name). Once its file calls the interface (Falcon, GPT-J, CodeGen in 5.25) the refusal would be false: the
    model is served, runs our kernel and equals eager on a padded batch."""
    from mfa_hf.integrations.transformers import internals, unsupported

    model = LEGACY[name]()
    inline = (internals.modeling_source_picks_attention_class_by_name(type(model))
              or not internals.can_set_attn_implementation(type(model))
              or not internals.modeling_source_calls_interface(type(model)))
    if inline:
        instead = "sdpa" if internals.supports_sdpa(model) else "eager"
        _assert_refused(model, implementation, rf"{type(model).__name__}.*\"{implementation}\".*\"{instead}\"")
        return
    _assert_padded_logits_equal_eager(type(model), model.config, implementation, name)


def _assert_padded_logits_equal_eager(model_cls, config, implementation: str, what: str) -> None:
    """The class built under eager and under `implementation` with the same weights: logits on a left-padded
    batch equal on the valid positions, our kernel run."""
    torch.manual_seed(0)
    reference = model_cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ours = model_cls._from_config(copy.deepcopy(config), attn_implementation=implementation).eval()
    ours.load_state_dict(reference.state_dict())
    ids, mask = padded_batch("left")
    with torch.no_grad(), trace.capture() as calls:
        got = ours(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    assert kernel_calls(calls) >= 1
    assert_close_where(got, expected, mask, what=f"{what} logits")


EAGER_ONLY = {  # transformers serves these with eager attention alone; their layers read the mask themselves
    "nllb_moe": lambda: tf.NllbMoeForConditionalGeneration(tf.NllbMoeConfig(
        vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, num_experts=4,
        expert_capacity=8, encoder_sparse_step=2, decoder_sparse_step=2, decoder_start_token_id=1)),  # router
    "bigbird_pegasus": lambda: tf.BigBirdPegasusModel(tf.BigBirdPegasusConfig(
        vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        attention_type="original_full")),  # scores + mask, inline
    "informer": lambda: tf.InformerModel(tf.InformerConfig(
        prediction_length=4, context_length=8, lags_sequence=[1, 2], d_model=32, encoder_layers=2, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32,
        num_time_features=1)),  # ProbSparse attention, inline
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", sorted(EAGER_ONLY))
def test_eager_only_models_refuse_with_the_model_name(name, implementation):
    """A class with no sdpa/flash/flex support in transformers is refused under both names: given our mask it was
    silently wrong (NLLB-MoE's router inverted a bool mask, BigBird-Pegasus added it as +1/0) or crashed inside the
    model (Informer)."""
    from mfa_hf.integrations.transformers import internals

    model = EAGER_ONLY[name]()
    if not internals.supports_only_eager(model):
        pytest.skip(f"{type(model).__name__} supports sdpa or flash in this transformers: not eager-only here")
    _assert_refused(model, implementation, rf"{type(model).__name__} supports only eager.*\"{implementation}\"")


def _seq2seq_tiny(model_cls, config_cls, **extra):
    return lambda: model_cls(config_cls(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                        num_heads=4, decoder_start_token_id=0, pad_token_id=0, **extra))


def _text_inputs(config):
    ids, mask = padded_batch("right", seq=12)
    inputs = dict(input_ids=ids.clamp(min=1), attention_mask=mask)
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = padded_batch("left", seq=6)[0].clamp(min=1)
    return inputs, mask


def _speech_inputs(config):
    mask = torch.ones(BATCH, 40, dtype=torch.long)
    mask[1, 28:] = 0
    features = torch.randn(BATCH, 40, 16, generator=torch.Generator().manual_seed(3))
    return dict(input_features=features, attention_mask=mask,
                decoder_input_ids=padded_batch("left", seq=6)[0].clamp(min=1)), None


def _time_series_inputs(config):
    g = torch.Generator().manual_seed(3)
    past = config.context_length + max(config.lags_sequence)
    observed = torch.ones(BATCH, past)
    observed[1, :3] = 0
    return dict(past_values=torch.randn(BATCH, past, generator=g), past_time_features=torch.randn(BATCH, past, 1, generator=g),
                past_observed_mask=observed, future_values=torch.randn(BATCH, config.prediction_length, generator=g),
                future_time_features=torch.randn(BATCH, config.prediction_length, 1, generator=g)), None


VERIFIED_EAGER_ONLY = {  # eager-only in transformers; their layers take the mask as given (unsupported.py)
    "splinter": (lambda: tf.SplinterModel(tf.SplinterConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64)), _text_inputs),
    "markuplm": (lambda: tf.MarkupLMModel(tf.MarkupLMConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64)), _text_inputs),
    "longt5_local": (_seq2seq_tiny(tf.LongT5ForConditionalGeneration, tf.LongT5Config, local_radius=2,
                                   encoder_attention_type="local"), _text_inputs),
    "longt5_transient_global": (_seq2seq_tiny(tf.LongT5ForConditionalGeneration, tf.LongT5Config, local_radius=2,
                                              global_block_size=4, encoder_attention_type="transient-global"),
                                _text_inputs),
    "speech_to_text": (lambda: tf.Speech2TextForConditionalGeneration(tf.Speech2TextConfig(
        vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=64,
        max_target_positions=64, input_feat_per_channel=16, num_conv_layers=2, conv_channels=16,
        conv_kernel_sizes=[5, 5], input_channels=1, decoder_start_token_id=2)), _speech_inputs),
    "time_series_transformer": (lambda: tf.TimeSeriesTransformerModel(tf.TimeSeriesTransformerConfig(
        prediction_length=4, context_length=8, lags_sequence=[1, 2], d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32,
        num_time_features=1)), _time_series_inputs),
}


def _main_output(output):
    for name in ("logits", "last_hidden_state"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    raise AssertionError(f"no logits or last_hidden_state in {type(output).__name__}")


@pytest.mark.parametrize("name", sorted(VERIFIED_EAGER_ONLY))
def test_verified_eager_only_classes_equal_eager(name):
    """Served under "mfa" (equal to eager with padding, our kernel run), refused under "mps_flash" with a message
    naming "mfa"."""
    build, make_inputs = VERIFIED_EAGER_ONLY[name]
    torch.manual_seed(0)
    reference = build().eval()
    if not internals.supports_only_eager(reference):
        pytest.skip(f"{type(reference).__name__} supports sdpa or flash in this transformers: not eager-only here")
    reference.set_attn_implementation("eager")
    model = copy.deepcopy(reference)
    model.set_attn_implementation("mfa")
    inputs, key_mask = make_inputs(model.config)
    with torch.no_grad():
        expected = reference(**inputs)
        with trace.capture() as calls:
            actual = model(**inputs)
    assert kernel_calls(calls) >= 2, trace.served_by(calls)
    have, want = _main_output(actual), _main_output(expected)
    assert_close_where(have, want, torch.ones(have.shape[:2]), what=f"{name} output")
    encoder = getattr(actual, "encoder_last_hidden_state", None)
    if encoder is not None and key_mask is not None:
        assert_close_where(encoder, expected.encoder_last_hidden_state, key_mask, what=f"{name} encoder states")
    with pytest.raises(UnsupportedModelError, match='"mps_flash" is refused; attn_implementation="mfa" serves it'):
        model.set_attn_implementation("mps_flash")


@pytest.mark.parametrize("encoder_attention_type", ["local", "transient-global"])
@pytest.mark.parametrize("name", ["mfa", "mps_flash"])
def test_longt5_encoder_alone_is_refused(encoder_attention_type, name):
    """LongT5's local and transient-global encoder attention computes inline (only its decoder's attention calls
    the interface): the encoder-only class would never run our kernel under either name, so both are refused at
    init and by set_attn_implementation; the full model stays served (test_verified_eager_only_classes_equal_eager)."""
    config = tf.LongT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, local_radius=2,
                             global_block_size=4, encoder_attention_type=encoder_attention_type)
    model = tf.LongT5EncoderModel(config)
    if internals.classes_call_interface(type(model), ("LongT5LocalAttention", "LongT5TransientGlobalAttention")):
        pytest.skip("this transformers routes LongT5's encoder attention through the interface")
    _assert_refused(model, name, "LongT5EncoderModel does not route attention through transformers' AttentionInterface")


def _assert_refused(model, implementation: str, message: str) -> None:
    """Refused through set_attn_implementation (with `message`) and at init from the model's config."""
    with pytest.raises(UnsupportedModelError, match=message):
        model.set_attn_implementation(implementation)
    config = model.config
    config._attn_implementation_internal = None
    with pytest.raises(UnsupportedModelError, match=type(model).__name__):
        type(model)._from_config(config, attn_implementation=implementation)


NO_SDPA = {  # refused (they do not route through the interface); transformers has no sdpa path for them either
    "deberta_v2": lambda: tf.DebertaV2Model(tf.DebertaV2Config(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                                               num_attention_heads=4, intermediate_size=64)),
    "mpnet": lambda: tf.MPNetModel(tf.MPNetConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=4, intermediate_size=64)),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", sorted(NO_SDPA))
def test_refusals_suggest_only_what_transformers_serves(name, implementation):
    """The refusal told users of DeBERTa-v2, MPNet, Funnel, ... to use "sdpa", which transformers then refuses for
    them; it suggests "sdpa" only where the class has an sdpa path, else "eager"."""
    from mfa_hf.integrations.transformers import internals

    model = NO_SDPA[name]()
    assert not internals.supports_sdpa(model)
    with pytest.raises(UnsupportedModelError) as refused:
        model.set_attn_implementation(implementation)
    assert '"eager"' in str(refused.value) and '"sdpa"' not in str(refused.value)


def test_falcon_with_alibi_refuses_the_flash_name_and_mfa_equals_eager():
    """Falcon with alibi=True adds its bias to the mask, which a flash path does not take: transformers raised at
    the first forward under "mps_flash" without naming "mfa". Now refused at init naming "mfa", which is exact."""
    from mfa_hf.integrations.transformers import internals

    config = tf.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                             new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True)
    if not internals.modeling_source_calls_interface(tf.FalconForCausalLM):  # before 5.25: inline, both refused
        for name in IMPLEMENTATIONS:
            with pytest.raises(UnsupportedModelError, match="does not route attention"):
                tf.FalconForCausalLM._from_config(copy.deepcopy(config), attn_implementation=name)
        return
    with pytest.raises(UnsupportedModelError, match=r'FalconForCausalLM.*"mps_flash".*"mfa"'):
        tf.FalconForCausalLM._from_config(copy.deepcopy(config), attn_implementation="mps_flash")
    _assert_padded_logits_equal_eager(tf.FalconForCausalLM, config, "mfa", "falcon alibi")
