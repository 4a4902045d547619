"""Set-time contract checks for diffusers' own `set_attn_processor` / `set_processor`.

Diffusers offers no hook when a processor is attached, so without this a wrong MFA processor set
through `model.set_attn_processor(...)` could only fail on its first call (mid-denoising). On the
diffusers versions we test, we wrap the three methods that attach processors so that an MFA
processor checks its module first:

    AttentionMixin.set_attn_processor   validates every module before any is changed (atomic)
    Attention.set_processor             validates the one module
    AttentionModuleMixin.set_processor  validates the one module

Foreign processors pass through untouched. The wrappers are marked, so installing twice is a no-op,
and `uninstall()` puts the originals back (tests use it).
"""

from __future__ import annotations

import functools

_MARK = "_mfa_set_time_check"


def _mfa_processors() -> tuple[type, ...]:
    from .processors import MFACogVideoXAttnProcessor, MFAJointAttnProcessor, MFAProcessor

    return (MFAProcessor, MFAJointAttnProcessor, MFACogVideoXAttnProcessor)


def _check(module, processor) -> None:
    if isinstance(processor, _mfa_processors()):
        processor.check(module)


def _checked_set_processor(original):
    @functools.wraps(original)
    def set_processor(self, processor, *args, **kwargs):
        _check(self, processor)
        return original(self, processor, *args, **kwargs)

    setattr(set_processor, _MARK, original)
    return set_processor


def _checked_set_attn_processor(original):
    @functools.wraps(original)
    def set_attn_processor(self, processor, *args, **kwargs):
        for name, module in self.named_modules():
            if not hasattr(module, "set_processor"):
                continue
            chosen = processor.get(f"{name}.processor") if isinstance(processor, dict) else processor
            _check(module, chosen)
        return original(self, processor, *args, **kwargs)

    setattr(set_attn_processor, _MARK, original)
    return set_attn_processor


def _targets():
    from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return ((Attention, "set_processor", _checked_set_processor),
            (AttentionModuleMixin, "set_processor", _checked_set_processor),
            (AttentionMixin, "set_attn_processor", _checked_set_attn_processor))


def install() -> None:
    for cls, name, wrap in _targets():
        current = cls.__dict__.get(name)
        if current is not None and not hasattr(current, _MARK):
            setattr(cls, name, wrap(current))


def uninstall() -> None:
    for cls, name, _ in _targets():
        current = cls.__dict__.get(name)
        if current is not None and hasattr(current, _MARK):
            setattr(cls, name, getattr(current, _MARK))
