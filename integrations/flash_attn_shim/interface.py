"""FlashAttention-2's public functions, with its signatures, served by mfa-hf kernels.

This is what `import flash_attn` returns while the shim is enabled. Meanings are FA2's, which are
ours (bottom-right causal, window_size=(-1, -1) unbounded, softcap 0 = off). Arguments we cannot
honour raise NotImplementedError naming them instead of being ignored.
"""

from __future__ import annotations

import torch

from mfa_hf import api, kvcache

NO_WINDOW = (-1, -1)


def _refuse(function: str, **given) -> None:
    """Raise naming every argument that came with a value the shim cannot serve."""
    names = [name for name, unsupported in given.items() if unsupported]
    if names:
        raise NotImplementedError(
            f"{function}: mfa-hf's flash_attn shim does not support {', '.join(names)} "
            "(expected the default; install the real flash-attn on CUDA for it)"
        )


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> (B, Sq, Hq, Dv)."""
    _refuse("flash_attn_func", return_attn_probs=return_attn_probs)
    return api.flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, tuple(window_size), softcap,
                               alibi_slopes, deterministic=deterministic)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=NO_WINDOW,
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (B, S, 3, H, D)."""
    _refuse("flash_attn_qkvpacked_func", return_attn_probs=return_attn_probs)
    q, k, v = qkv.unbind(2)
    return api.flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, tuple(window_size), softcap,
                               alibi_slopes, deterministic=deterministic)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=NO_WINDOW,
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Sq, Hq, D), kv (B, Sk, 2, Hkv, D)."""
    _refuse("flash_attn_kvpacked_func", return_attn_probs=return_attn_probs)
    k, v = kv.unbind(2)
    return api.flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, tuple(window_size), softcap,
                               alibi_slopes, deterministic=deterministic)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Packed q (Tq, Hq, D), k/v (Tk, Hkv, D); sequence b is rows cu_seqlens[b]:cu_seqlens[b + 1]."""
    _refuse("flash_attn_varlen_func", return_attn_probs=return_attn_probs, block_table=block_table is not None)
    return api.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                      dropout_p, softmax_scale, causal, tuple(window_size), softcap, alibi_slopes,
                                      deterministic=deterministic)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=NO_WINDOW, softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (T, 3, H, D)."""
    _refuse("flash_attn_varlen_qkvpacked_func", return_attn_probs=return_attn_probs)
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (Tq, Hq, D), kv (Tk, 2, Hkv, D)."""
    _refuse("flash_attn_varlen_kvpacked_func", return_attn_probs=return_attn_probs)
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention over a (B, S_max, Hkv, D) cache, appending k/v at cache_seqlens first (FA2's meaning)."""
    _refuse("flash_attn_with_kvcache", rotary_cos=rotary_cos is not None, rotary_sin=rotary_sin is not None,
            cache_leftpad=cache_leftpad is not None, block_table=block_table is not None)
    if isinstance(cache_seqlens, torch.Tensor):
        cache_seqlens = cache_seqlens.to(torch.int32)
    return kvcache.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, softmax_scale, causal, tuple(window_size),
        softcap, alibi_slopes, return_lse=return_softmax_lse, num_splits=num_splits)


__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]
