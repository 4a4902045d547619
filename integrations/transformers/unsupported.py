"""Refuse mfa-hf names, at model init, on models where they could not be right.

- Models whose attention layers bypass transformers' AttentionInterface (GPT-Neo, Bloom, MPT and other
  legacy ports compute attention inline; Falcon, GPT-J and CodeGen did before 5.25; LongT5EncoderModel, whose
  local and transient-global encoder attention is inline while LongT5's decoder is not): a registered function
  is never called, so "mps_flash"/"mfa" would be a silent no-op. transformers detects these classes for
  `set_attn_implementation` with a source heuristic; we add the types it passed, while their modeling
  file does not call the interface.
- Classes transformers serves only with eager attention (no sdpa/flash/flex flag: NLLB-MoE's router,
  BigBird-Pegasus's and Informer's inline attention read eager's additive mask themselves).
- "mps_flash" on classes transformers marks as not supporting FlashAttention (`_supports_flash_attn =
  False`: Gemma 3 / PaliGemma with image tokens, SigLIP2, ...): their FA path drops part of the
  mask, so transformers refuses flash_attention_2 there and we refuse our flash flavour the same
  way. "mfa" serves them with the model's full mask.
- "mps_flash" when the contract probe failed: our ContractError instead of transformers' generic
  "not supported", naming the release, the failed check and the alternatives.
"""

from __future__ import annotations

from typing import Callable

from . import internals

# Model types that computed attention inline in some tested release (5.17 and 5.24: Falcon, GPT-J, CodeGen;
# still in 5.25: GPT-Neo, Bloom, MPT) where transformers' source heuristic passed some of them (Bloom, CodeGen).
# One is refused while its modeling file does not call the AttentionInterface (internals probes the file:
# 5.25 ported Falcon, GPT-J and CodeGen, which then run our kernel).
INLINE_ATTENTION_MODEL_TYPES = frozenset({"falcon", "gptj", "gpt_neo", "bloom", "mpt", "codegen"})
# Encoder-decoder models whose encoder attention classes compute inline while the decoder's call the interface
# (LongT5's local and transient-global attention, 5.25): the full model runs our kernel in its decoder, but the
# encoder-only class (`*EncoderModel`) never would. Refused while those classes' source does not call the interface.
# PegasusX's block-local encoder attention likewise (it has no encoder-only class; listed so one would be refused).
INLINE_ENCODER_ATTENTION = {"longt5": ("LongT5LocalAttention", "LongT5TransientGlobalAttention"),
                            "pegasus_x": ("PegasusXGlobalLocalAttention",)}
# Falcon with ALiBi adds its position bias to the attention mask, which a flash path does not take: transformers
# raises at the first forward under any flash name; "mfa" takes the mask and is exact.
FLASH_DROPS_ALIBI_MODEL_TYPES = frozenset({"falcon"})
# Marked `_supports_flash_attn = False` only because FA2 cannot add T5's relative position bias;
# "mps_flash" hands a bias to the "mfa" path, which adds it exactly (model_tests: t5 under both names).
FLASH_BIAS_ONLY_MODEL_TYPES = frozenset({"t5", "mt5", "umt5"})
# Composite VLMs whose flash path drops the bidirectional image-token mask. transformers marks them
# `_supports_flash_attn = False` since 5.24; 5.17 did not, with the same flash path (model_tests:
# test_model_classes), so the model type decides too.
FLASH_DROPS_IMAGE_MASK_MODEL_TYPES = frozenset({"gemma3", "paligemma"})


class UnsupportedModelError(ValueError):
    """The model cannot be served correctly under the requested mfa-hf name."""


def routes_through_interface(model) -> bool:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if internals.modeling_source_picks_attention_class_by_name(type(model)):  # SAM's vision encoder, GIT, Bark
        return False
    if model_type in INLINE_ATTENTION_MODEL_TYPES and not internals.modeling_source_calls_interface(type(model)):
        return False
    inline_encoder = INLINE_ENCODER_ATTENTION.get(model_type)
    if (inline_encoder and type(model).__name__.endswith("EncoderModel")
            and not internals.classes_call_interface(type(model), inline_encoder)):
        return False
    return internals.can_set_attn_implementation(type(model))


def _flash_is_exact(model) -> bool:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in FLASH_DROPS_IMAGE_MASK_MODEL_TYPES:
        return False
    if model_type in FLASH_DROPS_ALIBI_MODEL_TYPES and getattr(config, "alibi", False):
        return False
    return internals.supports_flash_attention(model) or model_type in FLASH_BIAS_ONLY_MODEL_TYPES


def message(model, name: str) -> str:
    # Only what transformers itself serves for this class is suggested (DeBERTa-v2, MPNet, ... have no sdpa path).
    instead = '"sdpa" (or "eager")' if internals.supports_sdpa(model) else '"eager"'
    return (f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
            f'so attn_implementation="{name}" would never run mfa-hf\'s kernel. Use attn_implementation='
            f"{instead} for this model; mfa-hf serves models such as Llama, Mistral, Qwen2/3, "
            "Gemma 2/3, GPT-OSS, Phi-3, GPT-2, OPT, Whisper, T5, BERT, ModernBERT, CLIP and ViT.")


# Eager-only classes whose layers take the mask as given, verified equal to eager with padding under the neutral
# name (model_tests/transformers/test_registration.py, test_verified_eager_only_classes_equal_eager); transformers
# marks no flash support for them, so the flash name stays refused.
VERIFIED_EAGER_ONLY_MODEL_TYPES = frozenset({"splinter", "markuplm", "longt5", "speech_to_text",
                                             "time_series_transformer"})


def eager_only_message(model_cls: type, name: str) -> str:
    return (f"{model_cls.__name__} supports only eager attention in transformers (no sdpa or flash support): its "
            f"layers may read the attention mask themselves, in eager's additive form (a router, an inline or "
            f'sparse attention), so attn_implementation="{name}" could give wrong outputs. Use '
            'attn_implementation="eager" for this model.')


def verified_eager_only_message(model_cls: type, flash_name: str, neutral: str) -> str:
    return (f"{model_cls.__name__} supports only eager attention in transformers (no flash support), so "
            f'attn_implementation="{flash_name}" is refused; attn_implementation="{neutral}" serves it (verified equal '
            "to eager with padding).")


def flash_message(model_cls: type, name: str) -> str:
    return (f"{model_cls.__name__} does not support FlashAttention (transformers marks it `_supports_flash_attn = "
            f"False`: a flash path may drop part of the mask, e.g. a bidirectional image-token prefix, or the model "
            f'was never verified with one), so attn_implementation="{name}" could give wrong outputs. Use '
            'attn_implementation="mfa": the same kernels with the model\'s full mask.')


def paged_message(name: str) -> str:
    return (f'continuous batching (generate_batch) under attn_implementation="{name}" needs transformers >= 5.24 '
            f"(this is {internals.installed_version()}, whose paged attention functions update the cache themselves); "
            f'upgrade transformers, or use attn_implementation="sdpa" for generate_batch and "{name}" for generate().')


def install(flash_name: str, names: tuple[str, ...], probe: Callable[[], internals.ProbeResult]) -> None:
    """The init guard; `probe()` gives the (lazily completed) contract probe's result."""
    def check(model, requested: set) -> None:
        if f"paged|{flash_name}" in requested and internals.paged_names_are_separate():
            raise UnsupportedModelError(paged_message(flash_name))
        asked = requested & set(names)
        if not asked:
            return
        if not routes_through_interface(model):
            raise UnsupportedModelError(message(model, sorted(asked)[0]))
        if internals.supports_only_eager(model):
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if model_type not in VERIFIED_EAGER_ONLY_MODEL_TYPES:
                raise UnsupportedModelError(eager_only_message(type(model), sorted(asked)[0]))
            if flash_name in asked:
                neutral = next((n for n in names if n != flash_name), flash_name)
                raise UnsupportedModelError(verified_eager_only_message(type(model), flash_name, neutral))
        if flash_name in asked:
            result = probe()
            if not result.ok:
                raise result.error(flash_name)
            if not _flash_is_exact(model):
                raise UnsupportedModelError(flash_message(type(model), flash_name))
            internals.keep_flash_name(model, flash_name)

    try:
        internals.install_init_guard(check, propagate=names)
    except AttributeError as error:  # the guard's own hook point is gone: say so once, at registration
        import warnings

        warnings.warn(f"mfa_hf: cannot check models at init on transformers {internals.installed_version()} ({error}); "
                      f"{internals.ALTERNATIVES} remain available.", RuntimeWarning, stacklevel=3)
