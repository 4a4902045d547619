"""Refuse mfa-hf names, at model init, on models where they could not be right.

- Models whose attention layers bypass transformers' AttentionInterface (Falcon, GPT-J, GPT-Neo,
  Bloom, MPT, CodeGen and other legacy ports compute attention inline): a registered function is
  never called, so "mps_flash"/"mfa" would be a silent no-op. transformers detects these classes for
  `set_attn_implementation` with a source heuristic; we add the types it passes.
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

# Model types known to compute attention inline (GIT picks a class from a per-name table and fails
# with a KeyError on any other name), checked by reading their modeling files in 5.17
# and 5.24. Needed on top of transformers' source heuristic, which passes Bloom and CodeGen.
LEGACY_MODEL_TYPES = frozenset({"falcon", "gptj", "gpt_neo", "bloom", "mpt", "codegen", "git"})
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
    return model_type not in LEGACY_MODEL_TYPES and internals.can_set_attn_implementation(type(model))


def _flash_is_exact(model) -> bool:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in FLASH_DROPS_IMAGE_MASK_MODEL_TYPES:
        return False
    return internals.supports_flash_attention(model) or model_type in FLASH_BIAS_ONLY_MODEL_TYPES


def message(model_cls: type, name: str) -> str:
    return (f"{model_cls.__name__} does not route attention through transformers' AttentionInterface, "
            f'so attn_implementation="{name}" would never run mfa-hf\'s kernel. Use attn_implementation='
            '"sdpa" (or "eager") for this model; mfa-hf serves models such as Llama, Mistral, Qwen2/3, '
            "Gemma 2/3, GPT-OSS, Phi-3, GPT-2, OPT, Whisper, T5, BERT, ModernBERT, CLIP and ViT.")


def flash_message(model_cls: type, name: str) -> str:
    return (f"{model_cls.__name__} does not support FlashAttention (transformers marks it so: its flash path "
            f"drops part of the attention mask, e.g. the bidirectional image-token prefix), so "
            f'attn_implementation="{name}" would give wrong outputs. Use attn_implementation="mfa": the same '
            "kernels with the model's full mask.")


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
            raise UnsupportedModelError(message(type(model), sorted(asked)[0]))
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
