"""Processors we have no class of our own for, whose attention is a call of `F.scaled_dot_product_attention`.

AuraFlow, CogView4, HunyuanDiT, Lumina and Lumina 2, HiDream, EasyAnimate, Allegro, OmniGen, Stable Audio,
Sana's cross-attention, IP-Adapter and Custom Diffusion each compute plain softmax attention by calling
F.scaled_dot_product_attention inside a processor of their own (RoPE, norms and projections their own way);
Cosmos's processors call diffusers' dispatcher with no backend of their own, whose default backend calls it.
Rewriting each would copy all of that; instead enable() gives such a module its processor under a class that runs
the upstream `__call__` unchanged inside `sdpa_patched()` (integrations/sdpa_patch.py), so every SDPA call it makes is served by our kernels where
we reproduce that call's SDPA meaning exactly, and by stock SDPA otherwise (the reason counted in mfa_hf.trace).

The routed class subclasses the upstream one (isinstance checks hold) and keeps its `__call__` signature
(diffusers passes a processor only the keyword arguments its signature names). The routed processor shares the
upstream one's attribute dict rather than copying it: one state under two classes. So processors that are torch
modules route too (IP-Adapter's and Custom Diffusion's, whose weights stay the same Parameters: the state dict's
keys, `.to()` and training see one set), and what is set on the routed one while enabled
(`pipe.set_ip_adapter_scale(...)`) is what the upstream one has after restore(). Processors whose `__call__` does
not call SDPA by attribute (xformers, sliced, linear attention, the pre-2.0 IP-Adapter's baddbmm) are not routed:
enable() lists them in handle.skipped. Under torch.compile the upstream call runs as it is (the patch swaps a
module attribute, which a traced graph cannot).
"""

from __future__ import annotations

import functools
import inspect
import re

import torch

from ..sdpa_patch import sdpa_patched

# Every device: enable() asked for our kernels; calls we cannot reproduce exactly still go to stock SDPA.
ROUTED_DEVICES = ("mps", "cuda", "cpu")
_SDPA_CALL = re.compile(r"\b(?:F|(?:torch\.)?nn\.functional)\.scaled_dot_product_attention\(")
# A processor without a backend of its own (no `_attention_backend`: enable() looks for that first) that calls
# diffusers' dispatcher: the dispatcher's active backend serves the call, "native" by default, which calls
# F.scaled_dot_product_attention at call time, so the patch reaches it (Cosmos's processors).
_DISPATCH_CALL = re.compile(r"\bdispatch_attention_fn\(")
_routed_classes: dict[type, type] = {}


def routable(processor) -> bool:
    """Whether `processor` computes its attention by calling F.scaled_dot_product_attention from its own
    `__call__` (found at call time, so the patch reaches it), or diffusers' dispatcher without a backend of its
    own, and keeps its state in an attribute dict."""
    if is_routed(processor) or not isinstance(getattr(processor, "__dict__", None), dict):
        return False  # a slotted object has no dict to share
    try:
        source = inspect.getsource(type(processor).__call__)
    except (OSError, TypeError):  # no source (built at run time, or a C callable): cannot tell
        return False
    return calls_sdpa(source) or _DISPATCH_CALL.search(source) is not None


def calls_sdpa(source: str) -> bool:
    """Whether Python source calls F.scaled_dot_product_attention by attribute (so the patch reaches the call)."""
    return _SDPA_CALL.search(source) is not None


def is_routed(processor) -> bool:
    return type(processor) in _routed_classes.values()


def routed(processor):
    """`processor` under a class whose SDPA calls go through sdpa_patched(): a second object sharing its attribute
    dict (see the module docstring), so the upstream object, which restore() puts back, is never out of date."""
    view = object.__new__(_routed_class(type(processor)))
    object.__setattr__(view, "__dict__", processor.__dict__)  # past nn.Module.__setattr__: a plain instance dict
    return view


def _routed_class(upstream: type) -> type:
    if upstream not in _routed_classes:
        call = upstream.__call__

        @functools.wraps(call)  # __wrapped__: inspect.signature reports the upstream parameters
        def __call__(self, *args, **kwargs):
            if torch.compiler.is_compiling():
                return call(self, *args, **kwargs)
            with sdpa_patched(devices=ROUTED_DEVICES, min_scores=0):
                return call(self, *args, **kwargs)

        def __reduce_ex__(self, protocol):  # the class is made at run time: pickle names the upstream one
            return _unpickle_routed, (upstream, self.__getstate__())

        _routed_classes[upstream] = type(f"MFARouted{upstream.__name__}", (upstream,), {
            "__call__": __call__, "__reduce_ex__": __reduce_ex__, "__module__": __name__,
            "serves": f"{upstream.__name__}, its F.scaled_dot_product_attention calls routed to mfa-hf"})
    return _routed_classes[upstream]


def _unpickle_routed(upstream: type, state: dict):
    """A routed processor back from pickle (torch.save of a whole model, copy.deepcopy, spawned workers): the upstream
    processor rebuilt from its state as pickle would (nn.Module's __setstate__ where it has one), routed again, so a
    saved model loads with the processors it was saved with."""
    processor = upstream.__new__(upstream)
    if hasattr(processor, "__setstate__"):
        processor.__setstate__(state)
    else:
        processor.__dict__.update(state or {})  # object.__getstate__ gives None for an empty dict
    return routed(processor)
