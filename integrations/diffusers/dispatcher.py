"""The "mfa" backend of diffusers' attention dispatcher (Flux, Wan, LTX, QwenImage, ...).

This file is the backend function itself, in diffusers' backend signature. Registering it is not
here: diffusers keeps its backends in a closed Enum (`AttentionBackendName`) and a private registry,
so adding "mfa" touches private names, and that lives in internals.py behind a probe of the contract
(`register_mfa_backend()` there). Importing mfa_hf.integrations.diffusers runs the probe.

Registration is additive: it changes no model and not the active backend. What does change global
state is diffusers' own `model.set_attention_backend("mfa")`: besides setting each processor's
backend it makes "mfa" the *global* active backend for every dispatcher model (and
`reset_attention_backend()` does not undo that). `with attention_backend("mfa"):` restores the previous
global on exit, and `enable()` sets per-processor backends only, never the global.

Under context parallelism (`model.enable_parallelism(config=ContextParallelConfig(...))`) the backend
hands the call to context_parallel.py: diffusers' ring/Ulysses templates with our forward/backward
ops, or our own ring for causal and GQA calls, which the templates refuse.
"""

from __future__ import annotations

import torch

from .attend import attend_bshd

BACKEND_NAME = "mfa"


def mfa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                  scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
                  _parallel_config=None):
    """diffusers' backend signature: (B, S, H, D) tensors -> (B, Lq, H, Dv) [, lse (B, Lq, H) float32].

    The parameter names are the contract: the dispatcher drops every keyword a backend does not
    declare, so attn_mask and return_lse must stay spelled exactly so (internals.probe() checks
    that the dispatcher still passes them under these names, and drops the ones we do not declare).
    """
    if _parallel_config is not None:
        if not hasattr(_parallel_config, "context_parallel_config"):
            raise NotImplementedError(f"_parallel_config: expected a diffusers ParallelConfig (or None), got "
                                      f"{type(_parallel_config).__name__}")
        if _parallel_config.context_parallel_config is not None:
            from .context_parallel import attend_context_parallel  # local: torch.distributed only when used

            return attend_context_parallel(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                           return_lse, _parallel_config)
    return attend_bshd(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse)
