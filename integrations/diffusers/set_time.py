"""Set-time contract checks for diffusers' own `set_attn_processor` / `set_processor`.

Diffusers offers no hook when a processor is attached, so without this a wrong MFA processor set
through `model.set_attn_processor(...)` could only fail on its first call (mid-denoising). When the
probe of diffusers' internals passes, internals.py replaces the three methods that attach
processors with the wrappers below, so that an MFA processor checks its module first:

    AttentionMixin.set_attn_processor   validates every module before any is changed (atomic)
    Attention.set_processor             validates the one module
    AttentionModuleMixin.set_processor  validates the one module

Foreign processors pass through untouched. Each wrapper keeps the method it wraps (`original`), so
installing twice is a no-op and uninstalling puts the original back. This file only builds the
wrappers; which diffusers classes get them is internals.py's business.
"""

from __future__ import annotations

import functools

_MARK = "mfa_set_time_original"  # our attribute on our wrapper functions: the method they wrap


def _mfa_processors() -> tuple[type, ...]:
    from .processors import MFACogVideoXAttnProcessor, MFAJointAttnProcessor, MFAProcessor

    return (MFAProcessor, MFAJointAttnProcessor, MFACogVideoXAttnProcessor)


def _check(module, processor) -> None:
    """Our processor replaces the module's current one only where that one follows the same contract (the
    math ours computes): Sana's linear attention or CogView3Plus's own processor look like attention modules,
    and softmax attention in their place was silently wrong or failed later with a shape error."""
    if not isinstance(processor, _mfa_processors()):
        return
    from .contracts import ContractMismatch
    from .enable import follows_contract

    processor.check(module)  # the module's own structure first: its message names what differs
    held = getattr(module, "processor", None)  # None while the module is being built with our processor
    if held is not None and not follows_contract(held, processor):
        raise ContractMismatch(f"{type(module).__name__}: its processor {type(held).__name__} does not compute what "
                               f"{type(processor).__name__} serves ({processor.serves}); use "
                               f"mfa_hf.integrations.diffusers.enable(model) to pick per module")


def _checked_set_processor(original):
    @functools.wraps(original)
    def set_processor(self, processor, *args, **kwargs):
        _check(self, processor)
        return original(self, processor, *args, **kwargs)

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

    return set_attn_processor


_WRAPPERS = {"set_processor": _checked_set_processor, "set_attn_processor": _checked_set_attn_processor}


def wrap(method_name: str, original):
    """The checking wrapper of diffusers' `method_name`; `original` is called once the check passed."""
    wrapper = _WRAPPERS[method_name](original)
    setattr(wrapper, _MARK, original)
    return wrapper


def is_wrapper(function) -> bool:
    return hasattr(function, _MARK)


def original(wrapper):
    return getattr(wrapper, _MARK)
