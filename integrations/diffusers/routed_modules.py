"""Diffusers modules whose SDPA calls enable() cannot reach by swapping a processor: routed around their forward.

Two kinds. Modules with no attention processor that call F.scaled_dot_product_attention in their own methods: the
Wan, QwenImage, HunyuanImage, HunyuanVideo 1.5 and VidTok VAEs' mid-block attention (one head over every pixel of
a frame: the largest attention of a video pipeline's decode), Mochi's attention pool, Sana-WM's softmax attention.
And attention modules whose processor calls SDPA but that have no set_processor (Mochi's attention, the Cosmos
VAE's), which enable() decides on in its processor loop. Either way the module's forward runs inside
`sdpa_patched()`, as routed.py's processors do, so each SDPA call it makes is served by our kernels where we
reproduce that call's SDPA meaning exactly, and by stock SDPA otherwise.

How: a forward pre-hook opens the patch and a forward hook registered with always_call=True closes it, so an
exception inside forward closes it too. Hooks rather than a class swap: the module keeps its class (isinstance,
state dict and pickling are untouched), a saved or copied model keeps the two hook functions (module-level, so
they pickle by name), and restore() removes them by handle. Only classes defined in diffusers are routed: a user's
own module is theirs to route (mfa_hf.replace_sdpa()). Under torch.compile the forward runs as it is (the patch
swaps a module attribute, which a traced graph cannot).
"""

from __future__ import annotations

import functools
import inspect
import threading

import torch
from torch import nn

from ..sdpa_patch import sdpa_patched
from .routed import ROUTED_DEVICES, calls_sdpa

_open = threading.local()  # this thread's open patches, innermost last (a routed module may run inside another)


def routable_module(module: nn.Module) -> bool:
    """Whether `module` is a diffusers module (not an attention processor's host) whose class calls
    F.scaled_dot_product_attention in its own methods (forward, or a method forward calls: VidTok's `attention`),
    and is not routed yet."""
    if callable(getattr(module, "processor", None)) or is_routed_module(module):
        return False
    return _class_calls_sdpa(type(module))


@functools.lru_cache(maxsize=None)
def _class_calls_sdpa(cls: type) -> bool:
    """Per class, not per module: enable() walks every module of a pipeline, and reading source is slow."""
    if not cls.__module__.startswith("diffusers."):
        return False
    for klass in cls.__mro__:
        if klass.__module__.startswith("diffusers."):
            try:
                if calls_sdpa(inspect.getsource(klass)):
                    return True
            except (OSError, TypeError):  # no source: cannot tell
                continue
    return False


# Set on a routed module beside its hooks: copied and pickled with them, so a copy of a routed model is known
# to be routed (no second pair of hooks).
MARK = "mfa_hf_routes_sdpa"


def is_routed_module(module: nn.Module) -> bool:
    return getattr(module, MARK, False) is True


def route_module(module: nn.Module) -> tuple:
    """Route `module`'s SDPA calls; the two hook handles, for unroute_module()."""
    setattr(module, MARK, True)
    return (module.register_forward_pre_hook(_enter),
            module.register_forward_hook(_leave, always_call=True))


def unroute_module(module: nn.Module, hooks: tuple) -> None:
    for hook in hooks:
        hook.remove()
    if is_routed_module(module):
        delattr(module, MARK)


def _enter(module, args) -> None:
    if torch.compiler.is_compiling():
        return
    patch = sdpa_patched(devices=ROUTED_DEVICES, min_scores=0)
    patch.__enter__()
    _stack().append((module, patch))


def _leave(module, args, output) -> None:
    stack = _stack()
    if stack and stack[-1][0] is module:  # nothing was opened under torch.compile
        stack.pop()[1].__exit__(None, None, None)


def _stack() -> list:
    stack = getattr(_open, "stack", None)
    if stack is None:
        stack = _open.stack = []
    return stack
