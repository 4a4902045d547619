"""The kind of a plain `flash_attn_func` call: what its checks and its route depend on, and nothing else.

A model calls attention with the same shapes, dtypes and options in every layer and every step. The
first call of a kind is validated, routed and dispatched in full (api.py); its Decision is kept under
this key, and later calls of the kind only build the call and launch. The key must therefore hold
everything the checks, the route and the backend choice read:
- the tensors' types, shapes, strides, dtypes, devices, and whether gradients will be recorded;
- the options, only as plain Python numbers and bools (a tensor or numpy scalar takes the full path,
  which converts and checks it); bools never stand for numbers here;
- the environment variables that steer dispatch (decisions.py).
Plain means: no dropout, mask, ALiBi, sinks, dropout seed or generator (those take the full path). Under
torch.compile the full path runs, so that tracing sees no memo; inside a forward-AD level too (a tensor's
tangent is not in its type).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .decisions import steering_environment
from .ops import forward_ad_active
from .problem import NO_WINDOW

_NUMBERS = (int, float)


def plain_kind(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, return_lse):
    """The memo key of this call, or None when it must take the full path."""
    if not (type(q) is Tensor and type(k) is Tensor and type(v) is Tensor and type(causal) is bool
            and type(return_lse) is bool and type(dropout_p) in _NUMBERS and type(softcap) in _NUMBERS
            and (softmax_scale is None or type(softmax_scale) in _NUMBERS)):
        return None
    if dropout_p != 0:  # each call draws its own dropout seed: the full path
        return None
    if window_size is not NO_WINDOW and not (type(window_size) is tuple and len(window_size) == 2
                                             and type(window_size[0]) is int and type(window_size[1]) is int):
        return None
    if torch.compiler.is_compiling() or forward_ad_active() or q.is_nested or k.is_nested or v.is_nested:
        return None  # forward AD: the full path refuses a tangent by name (a replay dropped it)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, q.device,
            k.device, v.device, needs_grad, dropout_p, softmax_scale, causal, window_size, softcap, return_lse,
            steering_environment())
