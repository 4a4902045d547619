"""The "mfa" backend under diffusers' context parallelism (`model.enable_parallelism(config=...)`).

Diffusers runs a CP-capable backend through its templates (ring or Ulysses, `TemplatedRingAttention`
and friends): at every ring step they call the backend's forward op with return_lse=True and merge the
steps by LSE; training calls the backward op once per step with the globally merged out/lse. Those two
ops are here, on our kernels (mfa_hf.distributed.local: block forward with its LSE, block backward
from a given LSE). The templates refuse causal attention and GQA; those calls go to our own ring
(or Ulysses) instead, on the process group diffusers built for that degree. The private names
(the template function, the config's meshes) are read in internals.py.
"""

from __future__ import annotations

import math

import torch

from mfa_hf.distributed import ring_flash_attn_func, ulysses_flash_attn_func
from mfa_hf.distributed.local import BlockOptions, block_backward, block_forward

from . import internals

NO_WINDOW = (-1, -1)


def mfa_forward_op(ctx, query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                   scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
                   _save_ctx: bool = True, _parallel_config=None):
    """diffusers' forward_op: (B, S, H, D) -> out (B, S, H, Dv) [, lse (B, S, H) float32]."""
    _refuse(attn_mask, dropout_p, is_causal)
    options = BlockOptions(1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale), NO_WINDOW)
    out, lse = block_forward(query, key, value, options, needs_grad=query.requires_grad)
    if _save_ctx:
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.mfa_options = options
    return (out, lse.transpose(1, 2)) if return_lse else out


def mfa_backward_op(ctx, grad_out, *args, query=None, key=None, value=None, out=None, lse=None, **kwargs):
    """diffusers' backward_op: (dq, dk, dv) of one step; a ring passes the step's K/V and the merged
    out and lse (B, S, H), Ulysses passes none and the saved ones are used."""
    saved_query, saved_key, saved_value, saved_out, saved_lse = ctx.saved_tensors
    query = saved_query if query is None else query
    key = saved_key if key is None else key
    value = saved_value if value is None else value
    out = saved_out if out is None else out
    lse = saved_lse if lse is None else lse.transpose(1, 2)  # the templates hand it over as (B, S, H)
    return block_backward(grad_out.to(query.dtype), None, out.to(query.dtype), lse.float(), query, key, value,
                          ctx.mfa_options)


def attend_context_parallel(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                            parallel_config):
    """One attention call of a model under context parallelism."""
    if query.shape[2] == key.shape[2] and not is_causal:
        templated = internals.require_context_parallel()
        return templated(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                         forward_op=mfa_forward_op, backward_op=mfa_backward_op, _parallel_config=parallel_config)
    return _our_parallel(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                         parallel_config)


def _our_parallel(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                  parallel_config):
    """Causal or GQA (which diffusers' templates refuse): our ring, or our Ulysses."""
    internals.require_context_parallel()
    _refuse(attn_mask, dropout_p, False)
    if query.shape[2] != key.shape[2] and not enable_gqa:
        raise ValueError(f"key: expected {query.shape[2]} heads like query (or enable_gqa=True), got {key.shape[2]}")
    if is_causal and query.shape[1] != key.shape[1]:
        raise NotImplementedError(f"is_causal: expected as many query as key tokens per rank under context "
                                  f"parallelism (SDPA aligns causal top-left), got {query.shape[1]} and {key.shape[1]}")
    ring_group, ring_degree, ulysses_group, ulysses_degree = internals.context_parallel_groups(parallel_config)
    if ring_degree > 1 and ulysses_degree > 1:
        raise NotImplementedError("context_parallel_config: causal or GQA attention with both ring_degree and "
                                  "ulysses_degree > 1 is not supported by the 'mfa' backend; use one of them")
    function, group = (ring_flash_attn_func, ring_group) if ring_degree > 1 else (ulysses_flash_attn_func,
                                                                                   ulysses_group)
    result = function(query, key, value, group=group, causal=is_causal, return_lse=True, softmax_scale=scale)
    out, lse = result
    return (out, lse.transpose(1, 2)) if return_lse else out


def _refuse(attn_mask, dropout_p, is_causal) -> None:
    if attn_mask is not None:
        raise NotImplementedError("attn_mask: expected None under context parallelism with the 'mfa' backend "
                                  "(each rank holds only its keys), got a mask")
    if dropout_p:
        raise NotImplementedError(f"dropout_p: expected 0 under context parallelism with the 'mfa' backend, "
                                  f"got {dropout_p}")
    if is_causal:
        raise ValueError("is_causal: diffusers' context-parallel templates do not take causal attention; "
                         "the 'mfa' backend sends it through its own ring")
