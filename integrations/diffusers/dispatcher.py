"""The "mfa" backend of diffusers' attention dispatcher (Flux, Wan, LTX, QwenImage, ...).

diffusers keeps its backends in a closed Enum (`AttentionBackendName`) and every entry point calls
`AttentionBackendName(name)`, so a third party cannot register a plain string. We add one member,
MFA = "mfa", to that Enum and register our function under it. Adding a member touches private Enum
internals, so it is done only on the diffusers versions we test (compat.SUPPORTED_DIFFUSERS_VERSIONS)
and verified afterwards; elsewhere `register_mfa_backend()` raises UnsupportedDiffusersVersion.

Registration is additive: it changes no model and not the active backend. What does change global
state is diffusers' own `model.set_attention_backend("mfa")`: besides setting each processor's
backend it makes "mfa" the *global* active backend for every dispatcher model (and
`reset_attention_backend()` does not undo that). `with attention_backend("mfa"):` restores the previous
global on exit, and `enable()` sets per-processor backends only, never the global.
"""

from __future__ import annotations

import torch

from .attend import attend_bshd
from .compat import require_supported_diffusers

BACKEND_NAME = "mfa"
_MEMBER_NAME = "MFA"


def mfa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                  scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
                  _parallel_config=None):
    """diffusers' backend signature: (B, S, H, D) tensors -> (B, Lq, H, Dv) [, lse (B, Lq, H) float32].

    The parameter names are the contract: the dispatcher drops every keyword a backend does not
    declare, so attn_mask and return_lse must stay spelled exactly so.
    """
    if _parallel_config is not None:
        raise NotImplementedError("mfa attention backend: expected no context parallelism "
                                  "(_parallel_config=None), got a parallel config; use backend 'native' under CP")
    return attend_bshd(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse)


def register_mfa_backend():
    """Add "mfa" to diffusers' backend Enum and registry (idempotent); returns the Enum member."""
    require_supported_diffusers("the 'mfa' attention backend")
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    member = _enum_member(AttentionBackendName)
    if _AttentionBackendRegistry._backends.get(member) is not mfa_attention:
        _AttentionBackendRegistry.register(member, constraints=[], supports_context_parallel=False)(mfa_attention)
    return member


def _enum_member(enum_cls):
    existing = enum_cls._value2member_map_.get(BACKEND_NAME)
    if existing is not None:
        return existing
    member = str.__new__(enum_cls, BACKEND_NAME)
    member._name_, member._value_ = _MEMBER_NAME, BACKEND_NAME
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    type.__setattr__(enum_cls, _MEMBER_NAME, member)  # EnumType.__setattr__ refuses new members
    enum_cls._member_map_[_MEMBER_NAME] = member
    enum_cls._value2member_map_[BACKEND_NAME] = member
    enum_cls._member_names_.append(_MEMBER_NAME)
    _verify_member(enum_cls, member)
    return member


def _verify_member(enum_cls, member) -> None:
    """Every lookup diffusers performs must now find the member; if not, undo and say so."""
    found = (enum_cls(BACKEND_NAME) is member and member in list(enum_cls)
             and BACKEND_NAME in {m.value for m in enum_cls.__members__.values()})
    if not found:
        enum_cls._member_map_.pop(_MEMBER_NAME, None)
        enum_cls._value2member_map_.pop(BACKEND_NAME, None)
        if _MEMBER_NAME in enum_cls._member_names_:
            enum_cls._member_names_.remove(_MEMBER_NAME)
        raise RuntimeError(f"mfa attention backend: expected AttentionBackendName('{BACKEND_NAME}') to resolve "
                           f"after extending the Enum, got no member; this Python's Enum internals differ")
