"""The FlashAttention-2 call surface transformers' flash paths expect, served by mfa-hf kernels.

transformers' `_flash_attention_forward` calls `flash_fn(q, k, v, **kw)` on (B, S, H, D) and
`flash_varlen_fn(q, k, v, cu_seqlens_q=..., cu_seqlens_k=..., **kw)` on packed (T, H, D). It decides
which keyword arguments to send by inspecting these signatures (`_lazy_define_process_function`), so
the parameter names matter: `s_aux` is how it sends attention sinks (GPT-OSS), `window_size` the
sliding window, `softcap` the Gemma 2 logit cap.
"""

from __future__ import annotations

import torch

from ... import api

NO_WINDOW = (-1, -1)


def _sinks(s_aux: torch.Tensor | None) -> torch.Tensor | None:
    # transformers casts sinks to the query dtype "because FA only accepts half precision";
    # our kernels accumulate in fp32, so hand them back in fp32.
    return None if s_aux is None else s_aux.float()


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=NO_WINDOW,
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                    s_aux=None):
    """FA2 `flash_attn_func` on (B, S, H, D); `s_aux` is the per-head sink logit."""
    return api.flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                               window_size=tuple(window_size), softcap=softcap or 0.0,
                               alibi_slopes=alibi_slopes, sinks=_sinks(s_aux), deterministic=deterministic)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, s_aux=None):
    """FA2 `flash_attn_varlen_func` on packed (T, H, D) with int32 cumulative lengths."""
    return api.flash_attn_varlen_func(
        q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32), int(max_seqlen_q),
        int(max_seqlen_k), dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=tuple(window_size), softcap=softcap or 0.0, alibi_slopes=alibi_slopes,
        sinks=_sinks(s_aux), deterministic=deterministic)


def _kvcache_fn():
    """`flash_attn_with_kvcache` for transformers' paged continuous batching, or None.

    transformers calls it only with a `block_table` (paged cache). Ours (from the quantized-KV work)
    takes contiguous caches, so it is handed over only once it accepts `block_table`; until then
    continuous batching under mps_flash is refused by transformers' own None check rather than
    run with the wrong cache layout."""
    import inspect

    import mfa_hf

    fn = getattr(mfa_hf, "flash_attn_with_kvcache", None)
    return fn if fn is not None and "block_table" in inspect.signature(fn).parameters else None


def surface() -> tuple:
    """(flash_fn, varlen_fn, kvcache_fn) in the order transformers' `_lazy_imports` returns them."""
    return flash_attn_func, flash_attn_varlen_func, _kvcache_fn()
