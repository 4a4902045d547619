"""Run a routed call on the platform's own fused attention (torch SDPA), in our layout.

routes.py decided that SDPA computes exactly our result here; this only maps the call: (B, S, H, D)
-> SDPA's (B, H, S, D) as views, bottom-right causal -> SDPA's flag (Lq == Lk) or, for one query row
under a left window, a slice of the keys. SDPA records its own autograd graph (a fused backward on
the gated devices) and torch.compile traces it. The ATen binding is called, not
`torch.nn.functional.scaled_dot_product_attention` (the same function), so integrations/sdpa_patch.py
replacing the latter can never send a routed call back to us.
"""

from __future__ import annotations

import torch

from .kernels.contract import AttentionCall
from .routes import Route

_stock_sdpa = torch._C._nn.scaled_dot_product_attention  # what F.scaled_dot_product_attention is, unpatched


def sdpa(q, k, v, mask, route: Route, scale: float) -> torch.Tensor:
    """q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D), mask broadcastable to (B, Hq, Lq, Lk) -> (B, Lq, Hq, D)."""
    if route.key_start:
        k, v = k[:, route.key_start:], v[:, route.key_start:]
        mask = None if mask is None else mask[..., route.key_start:]
    batch, rows, heads_q, _ = q.shape
    heads_kv = k.shape[2]
    if rows == 1 and heads_q != heads_kv and mask is None and route.gate.stacks_query_groups:
        out = _query_groups_as_rows(q, k, v, scale)
    # Positional arguments and no default keywords: each keyword costs the binding's parser time per call.
    elif heads_q == heads_kv:
        out = _stock_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, 0.0, route.is_causal,
                          scale=scale).transpose(1, 2)
    else:
        out = _stock_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, 0.0, route.is_causal,
                          scale=scale, enable_gqa=True).transpose(1, 2)
    if route.gate.zeroes_nan_query_rows:
        out = _nan_rows_restored(q, out)
    return out


def _query_groups_as_rows(q, k, v, scale: float):
    """One query row (B, 1, Hq, D) over k/v (B, Lk, Hkv, D): the G = Hq / Hkv heads of KV head h become G
    rows of head h (query head h * G + g is row g, the GQA grouping), so the kernel reads each K/V head once."""
    batch, _, heads_q, dim = q.shape
    heads_kv = k.shape[2]
    rows = q.reshape(batch, heads_kv, heads_q // heads_kv, dim)
    out = _stock_sdpa(rows, k.transpose(1, 2), v.transpose(1, 2), None, 0.0, False, scale=scale)
    return out.reshape(batch, 1, heads_q, v.shape[-1])


def _nan_rows_restored(q, out):
    """Our semantics keep a NaN query row NaN; a kernel that zeroes it gets the NaN put back. Device ops
    only, no host read (a decode step reads nothing back, on any device: model_tests' host-read test)."""
    return out.masked_fill(q.isnan().any(-1, keepdim=True), float("nan"))


def replay(route: Route, scale: float):
    """A function (q, k, v) -> (out, None) for later plain calls of a kind routed here (mfa_hf/api.py): `sdpa` with
    the kind's route and scale, which the kind's shapes and options decided; SDPA records its own autograd graph,
    as on the full path."""
    return lambda q, k, v: (sdpa(q, k, v, None, route, scale), None)


def forward(call: AttentionCall, route: Route) -> torch.Tensor:
    return sdpa(call.q, call.k, call.v, call.attn_mask, route, call.options.scale)
