"""Run a routed call on the platform's own fused attention (torch SDPA), in our layout.

routes.py decided that SDPA computes exactly our result here; this only maps the call: (B, S, H, D)
-> SDPA's (B, H, S, D) as views, bottom-right causal -> SDPA's flag (Lq == Lk) or, for one query row
under a left window, a slice of the keys. SDPA records its own autograd graph (a fused backward on
the gated devices) and torch.compile traces it. The ATen binding is called, not
`torch.nn.functional.scaled_dot_product_attention` (the same function), so integrations/sdpa_patch.py
replacing the latter can never send a routed call back to us.
"""

from __future__ import annotations

import math

import torch

from . import ops
from .kernels.contract import AttentionCall
from .routes import Route
from .sdpa_semantics import mask_keys

_stock_sdpa = torch._C._nn.scaled_dot_product_attention  # what F.scaled_dot_product_attention is, unpatched


def sdpa(q, k, v, mask, route: Route, scale: float) -> torch.Tensor:
    """q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D), mask broadcastable to (B, Hq, Lq, Lk) -> (B, Lq, Hq, D)."""
    return sdpa_heads_first(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, route, scale).transpose(1, 2)


def sdpa_heads_first(q, k, v, mask, route: Route, scale: float, readable: bool | None = None) -> torch.Tensor:
    """`sdpa` in SDPA's own layout: q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) -> (B, Hq, Lq, Dv). A caller holding
    heads-first tensors (transformers' attention functions) pays no transposes. readable: whether q may be read
    on the host (see _nonfinite_rows_restored), when the caller already knows; None: find out."""
    if route.key_start:
        k, v = k[:, :, route.key_start:], v[:, :, route.key_start:]
        mask = mask_keys(mask, route.key_start)
    # From here the problem is plain: SDPA's top-left causal flag or none, over these keys (routes.py).
    batch, heads_q, rows, _ = q.shape
    heads_kv = k.shape[1]
    if rows == 1 and heads_q != heads_kv and mask is None and route.gate.stacks_query_groups \
            and stacking_pays(batch, heads_q, heads_kv, q.shape[-1], _threads()):
        out = _query_groups_as_rows(q, k, v, scale)
    elif route.gate.sdpa_backend is not None and not torch.compiler.is_compiling():  # compiled: fixed shapes
        out = _held_to(route.gate.sdpa_backend, q, k, v, mask, route.is_causal, scale)
    else:
        out = _plain_sdpa(q, k, v, mask, route.is_causal, scale)
    if route.gate.zeroes_nan_query_rows:
        out = _nonfinite_rows_restored(q, k, v, mask, route.is_causal, scale, out, readable)
    if route.gate.departs_on_infinite_scores:
        out = _infinite_score_rows_restored(q, k, v, mask, route.is_causal, scale, out, readable)
    return out


def _plain_sdpa(q, k, v, mask, is_causal: bool, scale: float):
    # Positional arguments and no default keywords: each keyword costs the binding's parser time per call.
    if q.shape[1] == k.shape[1]:
        return _stock_sdpa(q, k, v, mask, 0.0, is_causal, scale=scale)
    return _stock_sdpa(q, k, v, mask, 0.0, is_causal, scale=scale, enable_gqa=True)


_flags = torch.backends.cuda  # SDPA's backend switches (they govern every device's SDPA, the CPU's too)
_SWITCHES = {"flash": (_flags.flash_sdp_enabled, _flags.enable_flash_sdp),
             "cudnn": (_flags.cudnn_sdp_enabled, _flags.enable_cudnn_sdp),
             "efficient": (_flags.mem_efficient_sdp_enabled, _flags.enable_mem_efficient_sdp),
             "math": (_flags.math_sdp_enabled, _flags.enable_math_sdp)}


def _held_to(backend: str, q, k, v, mask, is_causal: bool, scale: float):
    """SDPA with only `backend` enabled (the gate's sdpa_backend), the switches restored after. Where that kernel
    cannot run here (an older GPU without flash attention), SDPA's own choice serves: the same semantics, the gate
    named the faster kernel. The switches directly, not torch.nn.attention.sdpa_kernel: the same flags at about a
    tenth of its host time (1 against 10 us a call on an x86 core), paid by every decode layer."""
    previous = [(enable, enabled()) for enabled, enable in _SWITCHES.values()]
    for name, (_, enable) in _SWITCHES.items():
        enable(name == backend)
    try:
        return _plain_sdpa(q, k, v, mask, is_causal, scale)
    except RuntimeError as error:  # cuda's words for no kernel, then the CPU's
        if not any(words in str(error) for words in ("No available kernel", "No viable backend")):
            raise
    finally:
        for enable, on in previous:
            enable(on)
    return _plain_sdpa(q, k, v, mask, is_causal, scale)


# What one stacked item costs, in items of one query head: 1 + (G - 1) * extra row. Measured with torch's CPU
# kernel (one row, 1k and 8k keys, one thread, G = 3-8): 0.2-0.3 at D=128, 0.35-0.9 at D=64. The worst of each
# is taken, so stacking is chosen only where it wins even then.
EXTRA_ROW_WIDE, EXTRA_ROW = 0.35, 0.9  # head dims >= 128, smaller ones


@torch.compiler.assume_constant_result  # a compiled graph keeps the choice of the count it was traced with
def _threads() -> int:
    return torch.get_num_threads()


def stacking_pays(batch: int, heads_q: int, heads_kv: int, head_dim: int, threads: int) -> bool:
    """Whether G rows per KV head beat the kernel's own GQA for one query row. The kernel splits (batch, head)
    items over its threads: stacking reads each K/V head once but leaves B * Hkv items, and where they do not
    fill the threads evenly it loses (9 / 3 heads on 2 threads: 3 items in 2 rounds, each 2.8 heads' work,
    against 9 items in 5 rounds; measured 1.2x slower), while one thread always gains (0.3-0.9x the time)."""
    threads = max(1, threads)
    group = heads_q // heads_kv
    stacked_rounds = -(-batch * heads_kv // threads)
    plain_rounds = -(-batch * heads_q // threads)
    extra_row = EXTRA_ROW_WIDE if head_dim >= 128 else EXTRA_ROW
    return stacked_rounds * (1 + (group - 1) * extra_row) <= plain_rounds


def _query_groups_as_rows(q, k, v, scale: float):
    """One query row (B, Hq, 1, D) over k/v (B, Hkv, Lk, D): the G = Hq / Hkv heads of KV head h become G
    rows of head h (query head h * G + g is row g, the GQA grouping), so the kernel reads each K/V head once."""
    batch, heads_q, _, dim = q.shape
    heads_kv = k.shape[1]
    rows = q.reshape(batch, heads_kv, heads_q // heads_kv, dim)
    out = _stock_sdpa(rows, k, v, None, 0.0, False, scale=scale)
    return out.reshape(batch, heads_q, 1, v.shape[-1])


def _nonfinite_rows_restored(q, k, v, mask, is_causal: bool, scale: float, out, readable: bool | None = None):
    """The reference's result for query rows holding NaN or inf, where the kernel differs: torch's CPU kernel
    returns 0 for a NaN row that sees keys, and NaN for an inf row its bool mask hides (it adds the mask).
    Rows of finite values are the kernel's, untouched.

    A finite q, the common case, costs one reduction (a NaN or inf makes the sum non-finite; an overflowing sum
    only sends a finite q the exact way) and a host read, free on CPU: the earlier row-wise restore cost 0.9 ms
    on a 1k-token call whose kernel took 14 ms. A q that is not finite gets its non-finite rows from our torch
    kernel, exact in every case (a row of ±inf scores is NaN or 0 depending on its keys).

    Where reading q back is not free or not allowed (another device, which a per-machine table may gate here;
    compiled or traced calls), the rows are fixed with device ops alone: NaN where the row sees a key (any
    additive mask lets a NaN through), else 0. That is the reference for NaN rows; for a row of ±inf it differs
    only when every key it sees scores -inf (the reference gives 0)."""
    if readable is None:
        readable = q.device.type == "cpu" and ops.plain_eager((q,), autograd=True)  # a free read, breaking no trace
    if readable and _finite(q):
        return out
    bad = ~torch.isfinite(q).all(-1, keepdim=True)  # (B, Hq, Lq, 1)
    if readable:
        return torch.where(bad, _ours(q, k, v, mask, is_causal, scale), out)
    if mask is None or mask.dtype != torch.bool:
        return out.masked_fill(bad, math.nan)
    seen = mask.any(-1, keepdim=True)  # (B|1, H|1, Lq|1, 1), as out's dims
    return out.masked_fill(bad & seen, math.nan).masked_fill(bad & ~seen, 0.0)


def _infinite_score_rows_restored(q, k, v, mask, is_causal: bool, scale: float, out, readable: bool | None = None):
    """The reference's result for query rows with an infinite score where the kernel departs from it (native_table's
    departs_on_infinite_scores): a key holding inf or NaN, or a +inf in an additive mask, makes a row 0 (a visible
    +inf score in half precision; the reference: NaN) or NaN (a +inf score its bool mask hides; the reference
    ignores that key). Non-finite queries are _nonfinite_rows_restored's.

    Such a row comes back all zeros or holding NaN, and needs k or the mask not finite: both are looked for, the
    cheaper first (a reduction over the output or over k, and a host read, free on CPU), and only rows that meet
    both are taken from our torch kernel, exact in every case (zero or NaN rows are legitimate too: every key
    hidden, NaN values). Where q may not be read on the host (compiled or traced calls), a zero row that sees a
    key becomes NaN where its keys (batch, KV head) hold a non-finite value or its mask row a +inf: the reference,
    except for a row whose visible values are all 0 or scores all -inf while a non-finite key of its head is
    hidden (the reference gives 0 there); a NaN row from a hidden +inf score stays NaN."""
    if readable is None:
        readable = q.device.type == "cpu" and ops.plain_eager((q,), autograd=True)
    additive = mask is not None and mask.dtype != torch.bool
    if readable:
        if out.numel() == 0:
            return out
        # the cheaper test first: the rows of a decode step's small output (about 3 us, a tenth of a 1k-key
        # decode call), or the keys of a prefill (a row reduction costs ~10x a sum an element on CPU)
        row_norms = _row_norms(out) if out.numel() * 8 <= k.numel() else None
        if row_norms is not None and float(row_norms.min()) > 0:
            return out
        if _finite(k) and not (additive and bool(mask.isposinf().any())):
            return out
        if row_norms is None:
            row_norms = _row_norms(out)
            if float(row_norms.min()) > 0:
                return out
        return torch.where(~(row_norms > 0), _ours(q, k, v, mask, is_causal, scale), out)
    zero = (out == 0).all(-1, keepdim=True)
    bad_keys = ~torch.isfinite(k).all(-1).all(-1)  # (B, Hkv)
    suspect = bad_keys.repeat_interleave(q.shape[1] // k.shape[1], 1)[:, :, None, None]
    if additive:
        suspect = (suspect | mask.isposinf().any(-1, keepdim=True)) & (mask > -math.inf).any(-1, keepdim=True)
    elif mask is not None:
        suspect = suspect & mask.any(-1, keepdim=True)
    return out.masked_fill(zero & suspect, math.nan)


def _row_norms(out):
    """(B, Hq, Lq, 1): each row's 2-norm, 0 for a zero row and NaN for one holding NaN (min() keeps it); a test
    only, off the graph (a host read of a tensor that requires grad warned)."""
    return torch.linalg.vector_norm(out.detach(), dim=-1, keepdim=True)


def _finite(q) -> bool:
    """Whether q holds only finite values, by one sum (float32: a half-precision sum overflows sooner)."""
    if q.requires_grad:
        q = q.detach()
    return math.isfinite(float(q.sum() if q.dtype == torch.float32 else q.sum(dtype=torch.float32)))


def _ours(q, k, v, mask, is_causal: bool, scale: float) -> torch.Tensor:
    """The same plain problem, heads first, on our torch kernel (no autograd graph: the rows it fills are not
    finite)."""
    from .kernels.contract import Options
    from .kernels.torch.forward import forward

    options = Options(scale, window_right=0 if is_causal else -1)
    q, k, v = (x.detach().transpose(1, 2) for x in (q, k, v))
    with torch.no_grad():
        return forward(AttentionCall(q, k, v, options, attn_mask=mask))[0].transpose(1, 2)


def replay(route: Route, scale: float):
    """A function (q, k, v) -> (out, None) for later plain calls of a kind routed here (mfa_hf/api.py): `sdpa` with
    the kind's route and scale, which the kind's shapes and options decided; SDPA records its own autograd graph,
    as on the full path."""
    return lambda q, k, v: (sdpa(q, k, v, None, route, scale), None)


def forward(call: AttentionCall, route: Route) -> torch.Tensor:
    return sdpa(call.q, call.k, call.v, call.attn_mask, route, call.options.scale)
