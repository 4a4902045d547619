"""Attention functions registered in transformers' AttentionInterface.

- `mfa_attention_forward` ("mfa"): takes the compact masks of masks.py (or a dense fallback) and
  calls `mfa_hf.flash_attention` with causal/window/softcap/sinks/bias applied by the kernel.
- `mps_flash_attention_forward` ("mps_flash"): the FlashAttention flavour. It runs transformers'
  own flash path (`_flash_attention_forward`: 2-D padding masks unpadded to varlen, `cu_seq_lens_*`
  for packed sequences, packed `position_ids`) on our FA2 surface, and switches to the "mfa" path
  for the inputs FA2's signature cannot carry (T5's `position_bias`, a dense 4-D mask), so nothing
  is dropped.

Both return (B, S_q, H_q, D_v) and None for the weights, as transformers' contract requires.
"""

from __future__ import annotations

import warnings

import torch

from ... import api
from . import decode, internals
from .mask_tags import tagged_pattern
from .step import once_per_mask
from .masks import is_packed_sequences


def _is_causal(module, is_causal: bool | None, q_len: int) -> bool:
    # Kwargs beat module attributes (CLIP text passes is_causal=True on a non-causal module).
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return bool(causal) and q_len > 1


def _window(sliding_window: int | None, kv_len: int) -> tuple[int, int]:
    # transformers' sliding window counts the current token: keep kv_pos > q_pos - sw, i.e. FA's
    # (sw - 1, sw - 1); the right side only matters for bidirectional models (ModernBERT).
    if sliding_window is None or sliding_window >= kv_len + 1:
        return (-1, -1)
    return (sliding_window - 1, sliding_window - 1)


def _bias_mask(mask: torch.Tensor | None, position_bias: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """Dense 4-D mask (bool or additive) combined with an additive bias, as one additive float mask."""
    if position_bias is None:
        return mask
    bias = position_bias.float()
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return bias + mask.float()


def _pattern(attention_mask, sliding_window, is_causal, q_len: int):
    """(mask, window, is_causal). A mask function of ours tagged the mask with the pattern it stands for
    (what eager applies), which wins over the module's kwargs, which some models omit or get wrong
    (mask_tags.Pattern); a mask made only to carry the tag is no mask. Key-validity masks come back as
    (B, L): tagged (B, 1, 1, L) ones, and untagged ones of several queries (a model sliced it and the tag
    is gone; an untagged single-row mask is a dense one, the whole truth for its query)."""
    pattern = tagged_pattern(attention_mask)
    if _is_key_mask(attention_mask) and (pattern is not None or q_len > 1):
        attention_mask = attention_mask[:, 0, 0, :]
    if pattern is None:
        return attention_mask, sliding_window, is_causal
    return (None if pattern.synthetic else attention_mask), pattern.window, pattern.causal


def _check_mask_covers_keys(module, attention_mask, key) -> None:
    """A padding mask built for another number of keys than the layer has: the model's cache reported the mask
    sizes of another layer (MiniMax's cache gives its full-attention layers a 1-key mask at decode steps).
    Eager broadcasts that mask over every key, which is wrong for padded rows too; read as key validity it
    would hide every key but the first ones from every row. Refused, naming what came."""
    pattern = tagged_pattern(attention_mask)
    if pattern is None or pattern.synthetic or pattern.kv_length is None or pattern.kv_length == key.shape[2]:
        return
    raise NotImplementedError(
        f"{type(module).__name__}: attention_mask was built for {pattern.kv_length} keys but this layer attends "
        f"over {key.shape[2]} (the model's cache reports the mask sizes of another layer; an encoder-decoder given "
        "one cache for both attentions needs EncoderDecoderCache(MFAQuantizedCache(...), DynamicCache())), so which "
        "keys are padding is unknown. Generate without padding (batch of one, or equal lengths), or use "
        'attn_implementation="eager" or "sdpa" for this model.')


def _is_key_mask(mask) -> bool:
    return mask is not None and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1 \
        and mask.dtype == torch.bool


def _sinks(module, s_aux, kwargs):
    """Sink logits: `s_aux` (GPT-OSS), or a `sinks` kwarg some models use instead. Per-head sinks (Hq,) are
    served; per-token ones (Inkling2 computes (B, Hq, Lq, 1) from the hidden states) are not, and are
    refused rather than dropped."""
    sinks = kwargs.pop("sinks", None)
    if sinks is None:
        return s_aux
    if s_aux is not None or sinks.dim() != 1:
        raise NotImplementedError(
            f"{type(module).__name__}: mfa-hf serves one sink logit per query head, got sinks of shape "
            f"{tuple(sinks.shape)} (per token); use attn_implementation=\"eager\" or \"sdpa\" for this model.")
    return sinks


def _selected_keys(module, attention_mask, indices, key):
    """The dense mask with only the keys a sparse-attention indexer selected left visible (what eager and sdpa
    get from DSA models: the selection folded into the mask). The indices (B, Lq, k) index the layer's keys; the
    indexer chose them over the dense mask's visible keys, which only a dense 4-D mask carries (masks.py gives
    one to every model with such an indexer): with a compact mask the selection itself would be wrong."""
    if attention_mask is None or attention_mask.dim() != 4:
        got = "no mask" if attention_mask is None else f"a {attention_mask.dim()}-D mask"
        raise NotImplementedError(
            f"{type(module).__name__}: the model passes sparse top-k key indices ({internals.SPARSE_INDICES_KWARG}=), "
            f"which mfa-hf applies on the dense 4-D mask its indexer read, got {got} (the model's config has no "
            "index_topk, so its mask was not built dense); use attn_implementation=\"eager\" or \"sdpa\" for this "
            "model.")
    q_len, keys = attention_mask.shape[2], key.shape[2]
    if indices.dim() != 3 or indices.shape[1] != q_len or indices.dtype.is_floating_point:
        raise ValueError(f"{internals.SPARSE_INDICES_KWARG}: expected integer top-k key indices (B, {q_len}, k), got "
                         f"a {indices.dtype} tensor of shape {tuple(indices.shape)}")
    chosen = torch.zeros(indices.shape[0], 1, q_len, keys, dtype=torch.bool, device=indices.device)
    chosen.scatter_(-1, indices[:, None].long(), True)
    mask = attention_mask[..., :keys]
    if mask.dtype == torch.bool:
        return mask & chosen
    # an additive mask takes the model's own fill (dtype min, as eager gets it), not -inf; a batch-1 mask broadcasts
    return torch.where(chosen, mask, torch.finfo(mask.dtype).min)


def _warn_no_weights(kwargs) -> None:
    # transformers' sdpa and flash paths warn and return no weights (model outputs carry `attentions=()`).
    if kwargs.pop("output_attentions", None):  # popped: the mps_flash -> mfa path would warn twice
        warnings.warn("mfa-hf attention does not return attention weights (output_attentions=True): like transformers' "
                      'sdpa and flash paths it computes them blockwise and never materializes them; `attentions` '
                      'stays empty. Use attn_implementation="eager" to get them.', UserWarning, stacklevel=3)


def mfa_attention_forward(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0,
                          sliding_window=None, softcap=None, s_aux=None, position_bias=None,
                          is_causal=None, **kwargs):
    """transformers attention function (B, H, S, D) -> ((B, S_q, H_q, D_v), None)."""
    _warn_no_weights(kwargs)
    s_aux = _sinks(module, s_aux, kwargs)
    _check_mask_covers_keys(module, attention_mask, key)
    attention_mask, sliding_window, is_causal = _pattern(attention_mask, sliding_window, is_causal, query.shape[2])
    indices = kwargs.pop(internals.SPARSE_INDICES_KWARG, None)
    if indices is not None:
        attention_mask = _selected_keys(module, attention_mask, indices, key)
    q_len = query.shape[2]
    causal = _is_causal(module, is_causal, q_len)
    routed = _decode_route(module, query, key, value, attention_mask, causal, scaling, sliding_window, softcap,
                           s_aux, position_bias)
    if routed is not None:
        return routed, None
    mask = attention_mask
    if is_packed_sequences(mask) and position_bias is None:
        return _packed_attention(query, key, value, mask, causal=causal, sliding_window=sliding_window,
                                 scaling=scaling, softcap=softcap, s_aux=s_aux,
                                 dropout=dropout if module.training else 0.0), None
    if is_packed_sequences(mask):  # with a bias: a dense same-sequence mask (no packed T5 exists upstream)
        mask = mask[:, None, :, None] == mask[:, None, None, :]
    if mask is not None and mask.dim() == 2:
        # Compact key validity (masks.py): the real keys are [:L]; the kernel aligns causal and the
        # window bottom-right within them, and padding is a (B, 1, 1, L) key mask.
        length = mask.shape[-1]
        key, value = key[:, :, :length], value[:, :, :length]
        # one host read per mask; none while compiling (a data-dependent branch), the key mask then stays
        all_valid = not torch.compiler.is_compiling() and once_per_mask(mask, ("all valid",), lambda: bool(mask.all()))
        mask = None if all_valid else mask[:, None, None, :]
        if position_bias is not None:
            position_bias = position_bias[..., :length]
    elif mask is not None:
        # Dense 4-D masks (a pattern we could not express) already encode causality and windows.
        mask = mask[..., : key.shape[2]]
        causal, sliding_window = False, None
    mask = _bias_mask(mask, position_bias, query.dtype)
    out = api.flash_attention(
        query, key, value, is_causal=causal, attn_mask=mask, window_size=_window(sliding_window, key.shape[2]),
        scale=scaling, softcap=softcap or 0.0, sinks=None if s_aux is None else s_aux.float(),
        dropout_p=dropout if module.training else 0.0)
    return out.transpose(1, 2), None


def _packed_attention(query, key, value, sequence_ids, *, causal, sliding_window, scaling, softcap, s_aux,
                      dropout):
    """Packed sequences (masks.packed_sequences) as one varlen call: (B, L, Hq, Dv)."""
    batch, heads, length, _ = query.shape
    cu_seqlens, longest = once_per_mask(sequence_ids, ("packed runs",), lambda: _runs(sequence_ids))

    def flat(x):
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], x.shape[-1])

    out = api.flash_attn_varlen_func(
        flat(query), flat(key), flat(value), cu_seqlens, cu_seqlens, longest, longest, dropout_p=dropout,
        softmax_scale=scaling, causal=causal, window_size=_window(sliding_window, length), softcap=softcap or 0.0,
        sinks=None if s_aux is None else s_aux.float())
    return out.reshape(batch, length, heads, out.shape[-1])


def _runs(sequence_ids):
    """(cu_seqlens int32, longest run) over the row-major flattened tokens: a run is a maximal stretch of
    one sequence id within a row (padding runs attend among themselves; their outputs are ignored)."""
    flat = sequence_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[:: sequence_ids.shape[-1]] = True
    bounds = torch.cat([starts.nonzero().flatten(), flat.new_tensor([flat.numel()], dtype=torch.long)])
    return bounds.to(torch.int32), int((bounds[1:] - bounds[:-1]).max())


def _decode_route(module, query, key, value, attention_mask, causal, scaling, sliding_window, softcap, s_aux,
                  position_bias):
    """Decode steps go to the decode op: always for MFAQuantizedCache handles, and for a small causal
    query against plain cached K/V without a mask. Returns (B, S_q, H_q, D_v), or None (not a decode)."""
    if key is None or value is None:
        raise ValueError(
            "key, value: expected tensors, got None: the model read its K/V back from a cache layer that holds none. "
            "MFAQuantizedCache's layers hold quantized codes, and encoder-decoder models reuse their cross-attention "
            "K/V from the cache: use EncoderDecoderCache(MFAQuantizedCache(...), DynamicCache()) so that the "
            "cross-attention half stays plain.")
    if decode.is_cache_view(key):
        if position_bias is not None:
            raise NotImplementedError("MFAQuantizedCache: position_bias (T5) is not supported with a quantized cache")
        return decode.quantized_attention(module, query, key, value, attention_mask, scaling=scaling,
                                          sliding_window=sliding_window, softcap=softcap, s_aux=s_aux, causal=causal)
    q_len, kv_len = query.shape[2], key.shape[2]
    # A backward through the step (gradients in eval mode) takes the general path: the decode op has none.
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    plain_decode = (position_bias is None and not module.training and not needs_grad
                    and (causal or q_len == 1) and q_len <= decode.DECODE_MAX_Q and kv_len > q_len
                    and key.shape[-1] == value.shape[-1] and getattr(module, "layer_idx", None) is not None)
    if not plain_decode:
        return None
    options = dict(scaling=scaling, sliding_window=sliding_window, softcap=softcap, s_aux=s_aux)
    if attention_mask is None:
        return decode.plain_decode(query, key, value, **options)
    # A 2-D key mask (padding, a static cache's unfilled tail) the decode op can express, else None.
    return decode.padded_plain_decode(query, key, value, attention_mask, **options)


def _packed(kwargs) -> bool:
    """Packed sequences: FA-style cumulative lengths (DataCollatorWithFlattening, and transformers'
    continuous batching since 5.24, whose K/V hold every request of the batch)."""
    return kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None


def _needs_mfa_path(attention_mask, kwargs) -> bool:
    """Inputs FA2's signature cannot carry exactly go to the "mfa" path: T5's position_bias, a dense
    4-D mask, a 2-D padding mask, and a sparse-attention indexer's top-k key indices. transformers' flash
    path unpads a 2-D mask assuming left padding whenever Lq != Lk and applies it to the queries too,
    which is wrong for cross-attention (the mask is the encoder's) and for right-padded chunks; as a key
    mask it is exact everywhere."""
    return (attention_mask is not None or kwargs.get("position_bias") is not None
            or kwargs.get(internals.SPARSE_INDICES_KWARG) is not None)


def mps_flash_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                sliding_window=None, softcap=None, is_causal=None, s_aux=None, **kwargs):
    """transformers attention function for "mps_flash": its flash path on mfa-hf's FA2 surface."""
    _warn_no_weights(kwargs)
    s_aux = _sinks(module, s_aux, kwargs)
    attention_mask, sliding_window, is_causal = _pattern(attention_mask, sliding_window, is_causal, query.shape[2])
    if kwargs.get("cache") is not None:
        # Up to 5.23 continuous batching hands the paged cache to the attention function to update;
        # since 5.24 the model updates it and we get K/V plus cu_seq_lens (served below).
        raise NotImplementedError(
            "mps_flash: continuous batching with this transformers release passes its paged cache to the attention "
            'function, which mfa-hf does not update; use transformers >= 5.24, attn_implementation="sdpa" with '
            "generate_batch, or plain generate() with mps_flash.")
    if not _packed(kwargs):
        routed = _decode_route(module, query, key, value, attention_mask,
                               _is_causal(module, is_causal, query.shape[2]), scaling, sliding_window, softcap, s_aux,
                               kwargs.get("position_bias"))
        if routed is not None:
            return routed, None
        if _needs_mfa_path(attention_mask, kwargs):
            if attention_mask is not None and attention_mask.dim() == 2:
                attention_mask = attention_mask.bool()  # transformers' FA mask is the user's 0/1 padding mask
            return mfa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                         dropout=dropout, sliding_window=sliding_window, softcap=softcap,
                                         s_aux=s_aux, is_causal=is_causal, **kwargs)
    q_len = query.shape[2]
    out = internals.flash_attention_forward(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask,
        query_length=q_len, is_causal=_is_causal(module, is_causal, q_len),
        dropout=dropout if module.training else 0.0, softmax_scale=scaling, sliding_window=sliding_window,
        softcap=softcap, s_aux=s_aux, attn_implementation=internals.attn_implementation_of(module),
        # no target_dtype: our kernels run fp32 as is (FA2 would need a cast to half)
        **{k: v for k, v in kwargs.items() if k not in ("position_bias",)})
    return out, None
