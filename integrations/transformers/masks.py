"""The mask function registered for "mfa": compact masks, dense only for patterns we cannot express.

transformers' mask builders (`create_causal_mask`, `create_sliding_window_causal_mask`,
`create_bidirectional_mask`, ...) call the registered function with the mask *pattern*
(`mask_function`) and the 2-D padding mask. The kernel applies causal and sliding-window masking
itself (from `is_causal` and the `sliding_window` kwarg the attention layers pass), so whenever the
pattern is made only of causal / bidirectional / sliding-window pieces we return:

- None: every key is real (no padding, no unused StaticCache slots);
- a 2-D bool (B, L) key-validity mask: keys [0, L) are the real ones (L < kv_length only for the
  unused tail of a StaticCache) and False marks padding. The attention function keeps keys [:L] and
  aligns causal/window bottom-right within them.

- a 2-D int32 (B, L) tensor of packed-sequence ids (restarting position_ids, 5.24's
  `and_masks(remap..., packed_sequence_mask_function)`): the attention function runs the packed
  sequences as one varlen call, no dense mask.

Anything else (image-token `or_mask_function`, chunked attention, vmap patterns) gets transformers'
own dense `sdpa_mask`, forced to a tensor so that None keeps meaning "compact".
"""

from __future__ import annotations

import torch

from . import internals
from .mask_tags import Pattern, tag_pattern

# Leaf mask patterns the kernel expresses through is_causal / window_size, by qualified name:
# the sliding-window overlays are closures, so identity checks cannot be used for them.
_EXPRESSIBLE = {
    internals.PACKED_SEQUENCE_LEAF,  # returned as per-token sequence ids, attended as varlen
    "causal_mask_function",
    "bidirectional_mask_function",
    "sliding_window_overlay.<locals>.inner_mask",
    "sliding_window_bidirectional_overlay.<locals>.inner_mask",
}


def is_expressible(mask_function, use_vmap: bool = False) -> bool:
    """True when the kernel's causal/window flags plus key validity reproduce `mask_function`."""
    return not use_vmap and all(leaf in _EXPRESSIBLE for leaf in internals.mask_leaves(mask_function))


def _real_key_count(q_length, kv_length, q_offset, kv_offset, causal: bool) -> int:
    """How many leading keys hold real tokens: a StaticCache hands over its whole buffer."""
    if not causal:
        return kv_length
    filled = int(q_offset) + q_length - int(kv_offset)
    return max(0, min(kv_length, filled))


def _unwritten_keys_possible(q_length, kv_length, q_offset, kv_offset, mask_function) -> bool:
    """Keys past the last query under a causal pattern: only a static cache's buffer has them (a dynamic cache's
    keys end with the queries). A static layer gives its offset as a tensor (no host read to compare it)."""
    if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
        past = True
    else:
        past = kv_offset + kv_length > q_offset + q_length
    return past and (mask_function is None or torch.compiler.is_compiling() or _is_causal_pattern(mask_function))


def _is_causal_pattern(mask_function) -> bool:
    return any("causal" in leaf or leaf.startswith("sliding_window_overlay") for leaf in internals.mask_leaves(mask_function))


def compact_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, use_vmap=False, device="cpu", **kwargs):
    """Registered under "mfa" in AttentionMaskInterface; returns a tagged (B, 1, 1, L) bool key validity
    or (B, L) int32 packed-sequence ids, or (patterns the kernel cannot express) a dense 4-D mask."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = mask_function or causal_mask_function
    # Under torch.compile the pattern analysis (closure introspection) and the host reads below cannot be
    # traced: transformers' own dense mask is, and the attention function takes dense masks exactly.
    expressible = not torch.compiler.is_compiling() and is_expressible(mask_function, use_vmap)
    if expressible and _materialize_requested(q_length, mask_function, kwargs):
        expressible = False
    if not expressible:
        kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         use_vmap=use_vmap, device=device, **kwargs)
    sequence_ids = internals.packed_sequence_ids(mask_function)
    if sequence_ids is not None:
        packed = packed_sequences(sequence_ids, attention_mask, device)
        if packed is None:  # padding inside a packed sequence: only a dense mask expresses it
            return compact_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                                use_vmap=True, device=device, **kwargs)
        return with_pattern(packed, mask_function, batch_size, kv_length, device)
    length = _real_key_count(q_length, kv_length, q_offset, kv_offset, _is_causal_pattern(mask_function))
    return with_pattern(_key_validity(attention_mask, batch_size, length, kv_length, kv_offset, device), mask_function,
                       batch_size, kv_length, device)


# Models whose own code adds onto the mask it gets (Doge's dynamic mask), checked in 5.17 and 5.24; models with
# a sparse-attention indexer (internals.has_mask_reading_indexer) are found by their config.
CONSUMES_MASK_MODEL_TYPES = frozenset({"doge"})


def consumes_mask(config) -> bool:
    """Whether the model's own code reads the mask outside attention, so that it must be the dense mask eager
    gets: Doge adds its dynamic mask onto it; DSA models (DeepSeek-V3.2, GLM-MoE-DSA, ...) take their indexer's
    top-k over the keys it leaves visible (a key-validity mask there lets every query select future keys)."""
    return config is not None and (getattr(config, "model_type", None) in CONSUMES_MASK_MODEL_TYPES
                                   or internals.has_mask_reading_indexer(config))


def _materialize_requested(q_length: int, mask_function, kwargs) -> bool:
    """A model that consumes the mask itself needs it materialized, at every query length: a static cache's
    decode step included (a mask of the filled keys only does not fit the model's scores over the whole
    buffer). transformers also sets allow_is_causal_skip=False for packing (expressed as sequence ids here)
    and for the one-query steps of a compileable cache (a StaticCache), which generate compiles on cuda and
    mps: a compact mask grows by a key every step, and a new input shape each step recompiled the step until
    dynamo's recompile limit (sdpa's dense mask has the buffer's fixed size). The dense row costs nothing
    exact: uncompiled, the attention function reads it back as key validity and keeps the decode op
    (decode.padded_plain_decode)."""
    if consumes_mask(kwargs.get("config")):
        return True
    return kwargs.get("allow_is_causal_skip") is False and internals.packed_sequence_ids(mask_function) is None


def _key_validity(attention_mask, batch_size: int, length: int, kv_length: int, kv_offset, device):
    """None (every key real), or (B, L) bool: keys [0, L) hold tokens, False marks padding."""
    if attention_mask is None:
        if length == kv_length:
            return None
        return torch.ones(batch_size, length, dtype=torch.bool, device=device)
    valid = attention_mask.to(device=device, dtype=torch.bool)
    end = int(kv_offset) + length
    if valid.shape[-1] < end:  # the 2-D mask covers past + current tokens only
        valid = torch.nn.functional.pad(valid, (0, end - valid.shape[-1]), value=False)
    valid = valid[:, int(kv_offset):end]
    if length == kv_length and bool(valid.all()):
        return None
    return valid


def with_pattern(mask, mask_function, batch_size: int, kv_length: int, device, key_mask_dims: int = 4):
    """Tag the returned mask with the pattern it stands for (mask_tags.tag_pattern: causal or not, the
    sliding window); where there is no mask to tag, an all-valid one made only to carry the tag. A (B, L)
    key-validity mask is handed out as (B, 1, 1, L) (key_mask_dims=4): code outside attention that
    consumes the mask (SigLIP2's pooling head repeats it per head and query) expects a broadcastable
    4-D mask; the attention functions read it back as key validity."""
    pattern = Pattern(causal=_is_causal_pattern(mask_function), window=internals.mask_window(mask_function),
                      kv_length=kv_length if isinstance(kv_length, int) else None)
    if mask is None:
        mask, pattern = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device), Pattern(
            pattern.causal, pattern.window, synthetic=True, kv_length=pattern.kv_length)
    if key_mask_dims == 4 and mask.dtype == torch.bool:
        mask = mask[:, None, None, :]
    return tag_pattern(mask, pattern)


PADDING_SEQUENCE = -1


def packed_sequences(sequence_ids: torch.Tensor, attention_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """(B, L) int32 sequence index per token (padding: PADDING_SEQUENCE), for packed batches (restarting
    position_ids, q_length == kv_length). Tokens attend within their own sequence only: the
    attention function runs one varlen call over the packed sequences instead of a dense mask."""
    ids = sequence_ids.to(device=device, dtype=torch.int32)
    if attention_mask is None:
        return ids
    valid = attention_mask[:, -ids.shape[-1]:].to(device=device, dtype=torch.bool)
    # Padding inside a sequence (a valid token after a padded one of the same sequence) would split it
    # into two runs; only trailing padding per sequence is expressible.
    if bool((valid[:, 1:] & ~valid[:, :-1] & (ids[:, 1:] == ids[:, :-1])).any()):
        return None
    return ids.masked_fill(~valid, PADDING_SEQUENCE)


def is_packed_sequences(mask) -> bool:
    return mask is not None and mask.dim() == 2 and mask.dtype == torch.int32


def flash_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
               device="cpu", **kwargs):
    """Registered under "mps_flash": transformers' FA mask (None, or the 2-D padding mask), except under
    torch.compile, where its "all valid?" host read cannot be traced: the sliced 2-D mask is returned as
    is (the attention function applies it as a key mask either way)."""
    from transformers.masking_utils import flash_attention_mask

    if attention_mask is None and _unwritten_keys_possible(q_length, kv_length, q_offset, kv_offset, mask_function):
        # No mask came and the keys run past the last query: a StaticCache's slots not written yet, which
        # transformers' FA mask (None) lets flash attention read (bottom-right causal over every slot; a
        # forward with a StaticCache and no attention_mask, as in compiled decode loops). The "mfa" mask
        # counts the real keys (or, compiling, is the dense mask eager applies).
        return compact_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, None,
                            device=device, **kwargs)
    if torch.compiler.is_compiling():
        return None if attention_mask is None else attention_mask[:, -kv_length:]
    if kwargs.get("allow_is_causal_skip") is False and q_length == 1:
        # A compileable cache's decode step (see _materialize_requested): the dense row of the buffer's fixed
        # size, not FA's 2-D mask, which grows by a key every step and recompiled the step compiled by generate.
        return compact_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                            device=device, **kwargs)
    if mask_function is not None and not is_expressible(mask_function):
        # A pattern beyond causal, window, padding and packing: an or_masks union (Gemma 3 / EmbeddingGemma's
        # bidirectional window, |q - kv| < w over a causal sliding mask) or a model's own leaf. Neither a
        # tag nor FA2's flags carry it (the tag read it as no window at all); the dense mask eager applies,
        # which the "mfa" mask also falls back to, is exact.
        return compact_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                            device=device, **kwargs)
    mask = flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                **({} if mask_function is None else {"mask_function": mask_function}),
                                attention_mask=attention_mask, device=device, **kwargs)
    if mask_function is None:
        return mask
    return with_pattern(mask, mask_function, batch_size, kv_length, device, key_mask_dims=2)
