"""Refuse mfa-hf names on models whose attention layers bypass transformers' AttentionInterface.

Falcon, GPT-J, GPT-Neo, Bloom, MPT, CodeGen (and other legacy ports) compute attention inline, so a
registered function is never called: asking for "mps_flash"/"mfa" would be a silent no-op (or a
KeyError / a broken FlashAttention2 class deep inside the model). transformers already detects
these classes for `set_attn_implementation` (`_can_set_attn_implementation`, a source check for
`ALL_ATTENTION_FUNCTIONS.get_interface(`); we apply the same test at the single validation point
both `__init__` and `set_attn_implementation` go through, and raise naming the model.
"""

from __future__ import annotations

_ORIGINAL_ATTR = "_mfa_original_check_attn"

# Model types known to compute attention inline, checked by reading their modeling files in 5.17
# and 5.23. Needed on top of transformers' source heuristic, which passes Bloom and CodeGen.
LEGACY_MODEL_TYPES = frozenset({"falcon", "gptj", "gpt_neo", "bloom", "mpt", "codegen"})


def routes_through_interface(model) -> bool:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type not in LEGACY_MODEL_TYPES and type(model)._can_set_attn_implementation()


class UnsupportedModelError(ValueError):
    """The model does not route attention through transformers' AttentionInterface."""


def message(model_cls: type, name: str) -> str:
    return (f"{model_cls.__name__} does not route attention through transformers' AttentionInterface, "
            f'so attn_implementation="{name}" would never run mfa-hf\'s kernel. Use attn_implementation='
            '"sdpa" (or "eager") for this model; mfa-hf serves models such as Llama, Mistral, Qwen2/3, '
            "Gemma 2/3, GPT-OSS, Phi-3, GPT-2, OPT, Whisper, T5, BERT, ModernBERT, CLIP and ViT.")


def _keep_flash_name(model, name: str) -> None:
    """Models listing `_compatible_flash_implementations` (GPT-OSS: sink-capable FA kernels) make
    transformers swap any other flash name for the first entry of that list, a hub kernel. mfa-hf
    implements sinks, so add our name to this instance's list to keep the requested one."""
    compatible = getattr(model, "_compatible_flash_implementations", None)
    if compatible is not None and name not in compatible:
        model._compatible_flash_implementations = [*compatible, name]


def install(names: tuple[str, ...]) -> None:
    from transformers import PreTrainedModel

    if _ORIGINAL_ATTR in PreTrainedModel.__dict__:
        return
    original = PreTrainedModel._check_and_adjust_attn_implementation

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        if attn_implementation in names:
            if not routes_through_interface(self):
                raise UnsupportedModelError(message(type(self), attn_implementation))
            _keep_flash_name(self, attn_implementation)
        return original(self, attn_implementation, *args, **kwargs)

    original_set = PreTrainedModel.set_attn_implementation

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        # On classes its heuristic flags, transformers only *warns* and keeps the old implementation.
        requested = attn_implementation.get("") if isinstance(attn_implementation, dict) else attn_implementation
        if requested in names and not routes_through_interface(self):
            raise UnsupportedModelError(message(type(self), requested))
        return original_set(self, attn_implementation, *args, **kwargs)

    set_attn_implementation.__doc__ = original_set.__doc__
    setattr(PreTrainedModel, _ORIGINAL_ATTR, original)
    PreTrainedModel._check_and_adjust_attn_implementation = _check_and_adjust_attn_implementation
    PreTrainedModel.set_attn_implementation = set_attn_implementation
