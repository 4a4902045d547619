"""MFAQuantizedCache: a transformers Cache that keeps K/V as fp8_e4m3 / fp8_e5m2 / int8 / nf4 codes + scales.

    cache = MFAQuantizedCache(format="int8", config=model.config)        # residual_length=0
    model.generate(**inputs, cache=cache)         # attn "mps_flash" or "mfa"; past_key_values= before 5.24

Per layer, one growable store per side: a `QuantizedKV` buffer (B, capacity, Hkv, D) allocated by
`mfa_hf.allocate_kv_cache` (capacity grows by a quarter when full, in whole blocks of 256 tokens: appends
are in place, amortized O(1); at least one block, so a short context holds spare room, and from 1024
tokens at most ~25% of the store is spare),
plus an optional full-precision residual (B, Hkv, r, D) of the newest tokens (KIVI-style: once it
holds `residual_length` tokens it is quantized in one chunk at the start of the next update).

`update()` returns `QuantizedCacheView` handles, not tensors. The attention functions registered
by mfa-hf recognise them (decode.py) and hand the codes straight to `flash_attn_with_kvcache`, the
decode op: no dequantized copy of the cache is ever made. The one exception is the prefill of an
empty cache, which returns the exact K/V it was given (attention over the prompt is computed on the
values just projected, as transformers' own QuantizedCache does, and padding masks keep working);
those tokens are stored quantized for every later step.

Sliding-window layers (built from `config`: Mistral, Qwen2 layer_types, Gemma 2/3, GPT-OSS) keep
only their window: when the buffer is full, the last `sliding_window - 1` tokens move to the front
instead of growing it (so such a layer holds at most its window and a buffer's spare room: the buffer
of one 256-token block, or the block-rounded window with its growth). Without `config` every layer keeps
all tokens and the kernel applies the window (correct, more memory).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ...kvcache import allocate_kv_cache, append_kv, check_head_dim_fits_groups
from ... import scalars
from ...kv_formats import QUANTIZED, QUANTIZED_NAMES, spec
from ...quant import KVFormat, QuantizedKV, parse_format
from . import internals
from .cache_view import QuantizedCacheError, QuantizedCacheView
from .masks import consumes_mask
from .step import StepPlans

__all__ = ["FORMATS", "MFAQuantizedCache", "MFAQuantizedLayer", "QuantizedCacheError", "QuantizedCacheView"]

FORMATS = QUANTIZED_NAMES
# Models whose cache holds something other than per-head K/V (DeepSeek-V3 caches the MLA latent and
# expands it with linears after the cache), so a handle cannot go straight to the kernel.
LATENT_CACHE_MODELS = {"deepseek_v3": "the MLA latent (kv_lora_rank) and k_rot, expanded by linears after the cache"}
# Models whose attention code reshapes the K/V it gets back from the cache before attention (the handle is not a
# tensor), found by a sweep of transformers 5.25's causal LMs.
TRANSFORMED_KV_MODELS = {
    "diffllama": "splits its cached values into two halves (torch.chunk) for its differential attention",
    "jetmoe": "repeats its cached keys and values for each expert (.repeat)",
}
_MIN_CAPACITY = 256
# Capacity grows by a quarter (in whole blocks of _MIN_CAPACITY tokens) when full: appends stay
# amortized O(1), and the spare room is at most a quarter of the tokens held (doubling would leave up
# to half of a quantized cache's memory empty, eating the saving the format was chosen for).
_GROWTH = 1.25


def grown_capacity(capacity: int, needed: int) -> int:
    target = max(needed, int(capacity * _GROWTH), _MIN_CAPACITY)
    return -(-target // _MIN_CAPACITY) * _MIN_CAPACITY


class _Store:
    """One side's quantized buffer plus its residual; everything in time order."""

    def __init__(self, fmt: KVFormat, group_size: int | None):
        self.format, self.group_size = fmt, group_size
        self.buffer: QuantizedKV | None = None
        self.length = 0
        self.residual: torch.Tensor | None = None

    @property
    def residual_length(self) -> int:
        return 0 if self.residual is None else self.residual.shape[2]

    @staticmethod
    def append_quantized(stores: tuple, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write (B, H, n, D) key and value states after the K and V stores' valid prefix (equal lengths),
        quantized per token on the way in by the backend's append (mfa_hf.kvcache.append_kv: the metal
        backend's kernel quantizes on write)."""
        n = keys.shape[2]
        if n == 0:
            return
        k_store, v_store = stores
        for store, states in ((k_store, keys), (v_store, values)):
            store.reserve(states, store.length + n)
        append_kv(k_store.buffer, v_store.buffer, keys.transpose(1, 2), values.transpose(1, 2), k_store.length)
        k_store.length += n
        v_store.length += n

    def reserve(self, states: torch.Tensor, needed: int) -> None:
        capacity = 0 if self.buffer is None else self.buffer.shape[1]
        if needed <= capacity:
            return
        b, h, _, d = states.shape
        grown = allocate_kv_cache(b, grown_capacity(capacity, needed), h, d, self.format.value,
                                  dtype=states.dtype, device=states.device, group_size=self.group_size)
        if self.buffer is not None:
            grown.codes[:, : self.length] = self.buffer.codes[:, : self.length]
            grown.scales[:, : self.length] = self.buffer.scales[:, : self.length]
        self.buffer = grown

    def append_residual(self, states: torch.Tensor) -> None:
        self.residual = states if self.residual is None else torch.cat([self.residual, states], dim=2)

    @staticmethod
    def flush(stores: tuple, count: int) -> None:
        """Quantize the oldest `count` residual tokens of both stores (a whole number of chunks)."""
        if count:
            k_store, v_store = stores
            _Store.append_quantized(stores, k_store.residual[:, :, :count], v_store.residual[:, :, :count])
            for store in stores:
                rest = store.residual[:, :, count:]
                store.residual = rest if rest.shape[2] else None

    def drop_front(self, count: int) -> None:
        """Forget the oldest `count` quantized tokens by moving the rest to the front (sliding layers)."""
        if count:
            keep = self.length - count
            codes, scales = self.buffer.codes, self.buffer.scales
            codes[:, :keep] = codes[:, count: self.length].clone()
            scales[:, :keep] = scales[:, count: self.length].clone()
            self.length = keep

    def crop_end(self, count: int) -> None:
        """Remove the newest `count` tokens (residual first)."""
        from_residual = min(count, self.residual_length)
        if from_residual:
            rest = self.residual[:, :, : self.residual_length - from_residual]
            self.residual = rest if rest.shape[2] else None
        self.length -= count - from_residual

    def select_rows(self, index: torch.Tensor) -> None:
        """Rows `index` of codes, scales and residual together (beam reorder / select / repeat)."""
        if self.buffer is not None:
            b = self.buffer
            self.buffer = QuantizedKV(b.codes.index_select(0, index.to(b.device)),
                                      b.scales.index_select(0, index.to(b.device)), b.format, b.group_size, b.dtype)
        if self.residual is not None:
            self.residual = self.residual.index_select(0, index.to(self.residual.device))

    def view(self, step_plans: StepPlans | None = None, step: int = 0, window: int | None = None) -> QuantizedCacheView:
        return QuantizedCacheView(self.buffer, self.length, self.residual, step_plans, step, window)

    def nbytes(self) -> int:
        held = 0 if self.buffer is None else self.buffer.nbytes()
        return held + (0 if self.residual is None else self.residual.numel() * self.residual.element_size())



def _group_size(fmt: KVFormat, group_size) -> int | None:
    """Grouped formats (nf4): None (the default group) or one of their group sizes. The other formats keep
    one scale per (token, head): None only."""
    if group_size is None:
        return None
    described = spec(fmt)
    if not described.grouped:
        grouped = ", ".join(f.name for f in QUANTIZED if f.grouped)
        raise ValueError(f"group_size: expected None for {fmt.value} (one scale per token and head; only {grouped} "
                         f"has groups), got {group_size!r}")
    expected = f"{described.group_sizes_text()} for {fmt.value} (or None: {described.default_group_size})"
    size = scalars.int_like(group_size, "group_size", expected, ValueError)
    if size not in described.group_sizes:
        raise ValueError(f"group_size: expected {expected}, got {group_size!r}")
    return size


class MFAQuantizedLayer(DynamicLayer):
    """One attention layer's quantized K/V (see the module docstring). `sliding_window` None: keep all."""

    def __init__(self, format: str = "int8", residual_length: int = 0, group_size: int | None = None,
                 sliding_window: int | None = None, step_plans: StepPlans | None = None, **kwargs):
        super().__init__()
        # The cache's layers share one holder of the step's decode plan (decode.py).
        self.step_plans = StepPlans() if step_plans is None else step_plans
        self.format = parse_format(format)
        if self.format.value not in FORMATS:
            raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
        residual_length = scalars.int_at_least(residual_length, "residual_length", 0, ValueError)
        group_size = _group_size(self.format, group_size)
        sliding_window = None if sliding_window is None else scalars.int_at_least(sliding_window, "sliding_window", 1, ValueError)
        self.residual_length, self.group_size, self.sliding_window = residual_length, group_size, sliding_window
        self.is_sliding = sliding_window is not None
        self.cumulative_length = 0
        self.k = _Store(self.format, group_size)
        self.v = _Store(self.format, group_size)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    # -- `keys` / `values`: what transformers' own code reads off a layer ----------------------------------

    @property
    def keys(self) -> torch.Tensor | None:
        """The layer's K as a DynamicLayer holds it, (B, Hkv, L, D) in the model's dtype: a dequantized copy.
        Attention never reads it (update() hands the kernels the codes); code outside attention does, e.g.
        Whisper's generate splitting the cache per row for return_dict_in_generate, or cross-attention reuse."""
        return self._states(self.k)

    @keys.setter
    def keys(self, states) -> None:
        self._refuse_assignment("keys", states)

    @property
    def values(self) -> torch.Tensor | None:
        """The layer's V, as `keys`."""
        return self._states(self.v)

    @values.setter
    def values(self, states) -> None:
        self._refuse_assignment("values", states)

    def _states(self, store: _Store) -> torch.Tensor | None:
        if not self.is_initialized:
            return None
        if store.buffer is None and store.residual is None:
            return torch.empty(0, dtype=self.dtype, device=self.device)  # as DynamicLayer's before its first tokens
        return store.view().dequantize().to(self.dtype)

    @staticmethod
    def _refuse_assignment(name: str, states) -> None:
        if states is not None:  # CacheLayerMixin.__init__ assigns None; the stores hold the tokens
            raise AttributeError(f"MFAQuantizedLayer.{name} is read-only (a dequantized copy of the stored codes); "
                                 "add tokens with update()")

    # -- what update() will do, computed the same way by get_mask_sizes() ------------------------

    def _flush_count(self) -> int:
        r, chunk = self.k.residual_length, self.residual_length
        return (r // chunk) * chunk if chunk else 0

    def _drop_count(self, new: int) -> int:
        """Sliding layers: quantized tokens to forget before this update (when the buffer is full)."""
        if not self.is_sliding:
            return 0
        length = self.k.length + self._flush_count() + (0 if self.residual_length else new)
        capacity = 0 if self.k.buffer is None else self.k.buffer.shape[1]
        keep = max(self.sliding_window - 1 - self.k.residual_length, 0)
        return self.k.length - keep if length > capacity and self.k.length > keep else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The handle covers every stored token after the update: buffer prefix + residual.
        kv_length = self.k.length + self.k.residual_length - self._drop_count(query_length) + query_length
        return kv_length, self.cumulative_length + query_length - kv_length

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    # -- update ------------------------------------------------------------------------------------

    def update(self, key_states, value_states, *args, **kwargs):
        for name, states in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(states, torch.Tensor) or states.dim() != 4:
                got = f"shape {tuple(states.shape)}" if isinstance(states, torch.Tensor) else type(states).__name__
                raise ValueError(f"MFAQuantizedCache.update: {name}: expected a 4-D tensor (B, H, S, D), got {got}")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_batch(key_states.shape[0])  # before anything moves: a refused update leaves the layer as it was
        prefill = self.cumulative_length == 0
        drop, flush = self._drop_count(key_states.shape[2]), self._flush_count()
        stores = (self.k, self.v)
        for store in stores:
            store.drop_front(drop)
        _Store.flush(stores, flush)
        if self.residual_length:
            self.k.append_residual(key_states)
            self.v.append_residual(value_states)
        else:
            _Store.append_quantized(stores, key_states, value_states)
        self.cumulative_length += key_states.shape[2]
        if prefill:  # exact prompt attention; stored quantized for every later step
            return key_states, value_states
        return (self.k.view(self.step_plans, self.cumulative_length, self.sliding_window),
                self.v.view(self.step_plans, self.cumulative_length, self.sliding_window))

    def _check_batch(self, batch: int) -> None:
        stored = self.k.buffer if self.k.buffer is not None else self.k.residual  # QuantizedKV or (B, H, r, D)
        held = None if stored is None or not self.cumulative_length else stored.shape[0]
        if held is not None and batch != held:
            raise ValueError(f"MFAQuantizedCache.update: expected a batch of {held} rows like the tokens the cache holds, "
                             f"got {batch}; reset() the cache or make a new one for another batch (beam search and "
                             f"num_return_sequences resize it through batch_select_indices / batch_repeat_interleave)")

    # -- generate's cache manipulation: scales always move with their codes --------------------------

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop: expected a negative number of tokens to remove (or 0), got {tokens_to_remove}")
        count = -tokens_to_remove
        held = self.k.length + self.k.residual_length
        if count > held:
            raise ValueError(f"crop: cannot remove {count} tokens, the layer holds {held}")
        # A sliding layer that dropped its oldest tokens keeps only its window: cropping into it would leave the
        # next query fewer earlier keys than the window sees (silently wrong logits), as DynamicCache refuses too.
        if self.is_sliding and held - count < min(self.sliding_window - 1, self.cumulative_length - count):
            raise RuntimeError(f"crop: removing {count} tokens would leave {held - count} stored tokens, fewer than the "
                               f"{self.sliding_window - 1} earlier tokens this layer's sliding window sees: the layer "
                               f"keeps only its window (older tokens were dropped when its buffer filled)")
        for store in (self.k, self.v):
            store.crop_end(count)
        self.cumulative_length -= count

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.cumulative_length:
            index = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(indices)
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
            for store in (self.k, self.v):
                store.select_rows(index.long())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.cumulative_length:
            batch, device = self.k.view().shape[0], self.k.view().device
            index = torch.arange(batch, device=device).repeat_interleave(repeats)
            for store in (self.k, self.v):
                store.select_rows(index)

    def reset(self) -> None:
        self.__init__(self.format.value, self.residual_length, self.group_size, self.sliding_window, self.step_plans)

    def offload(self):  # the stores stay where they are (no offloading of quantized caches)
        pass

    def prefetch(self):
        pass

    def nbytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes()


def check_model_config(config) -> None:
    """Refuse models whose cache does not hold per-head K/V, naming the model and what it caches."""
    if not callable(getattr(config, "get_text_config", None)):
        raise TypeError("config: expected the model's transformers config (a PreTrainedConfig such as model.config), "
                        f"got {type(config).__name__}")
    text = config.get_text_config(decoder=True)
    reason = _not_per_head_kv(text)
    if reason:
        raise ValueError(f"MFAQuantizedCache: model_type {getattr(text, 'model_type', None)!r} {reason}. Use the "
                         "default DynamicCache for this model.")


_STRAIGHT = "so the quantized values cannot go straight to the attention kernel"


def _not_per_head_kv(text) -> str:
    """Why the model's attention cannot take the cache's handles as its K/V, or "" when it can."""
    model_type = getattr(text, "model_type", None)
    if model_type in LATENT_CACHE_MODELS or getattr(text, "kv_lora_rank", None) is not None:
        what = LATENT_CACHE_MODELS.get(model_type, "a compressed latent (kv_lora_rank), expanded after the cache")
        return f"caches {what}, not per-head K/V, {_STRAIGHT}"
    if model_type in TRANSFORMED_KV_MODELS:
        return f"{TRANSFORMED_KV_MODELS[model_type]} after the cache, {_STRAIGHT}"
    if getattr(text, "relative_attention_num_buckets", None) is not None:  # T5, mT5, UMT5, LongT5, Switch, ...
        return ("adds a learned relative position bias (position_bias) to its scores, which the quantized decode "
                "kernel does not take")
    if consumes_mask(text):
        return ("reads the attention mask in its own code (a sparse-attention indexer's top-k, or Doge's dynamic mask "
                "over its value states), so its decode steps need the dense mask and, for Doge, the cached values as "
                "tensors; the quantized decode kernel takes key-padding masks and hands the model codes, not tensors")
    return ""


def _stored_head_dims(text_config, layers: int) -> list[int]:
    """Every head dim a layer stores: keys' (per layer) and values' where a config sets them apart (v_head_dim)."""
    values = internals.per_layer_values(text_config, "v_head_dim", layers)
    return sorted({dim for dim in _head_dims(text_config, layers) + values if isinstance(dim, int)})


def _head_dims(text_config, layers: int) -> list[int | None]:
    """Each layer's head dim (heterogeneous configs give it per layer), or hidden size / heads where unset."""
    hidden, heads = (next(iter(internals.per_layer_values(text_config, name, layers)), None)
                     for name in ("hidden_size", "num_attention_heads"))
    derived = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None
    head_dims = internals.per_layer_values(text_config, "head_dim", layers)
    return [dim if isinstance(dim, int) else derived for dim in head_dims]


def _layer_kwargs(config) -> list[dict]:
    kwargs = []
    for i, (kind, extra) in enumerate(internals.layer_types_and_kwargs(config.get_text_config(decoder=True))):
        if kind not in ("full_attention", "sliding_attention", "chunked_attention"):
            raise ValueError(f"MFAQuantizedCache: layer {i} has type {kind!r}; expected full, sliding or chunked "
                             "attention layers")
        kwargs.append({"sliding_window": extra["sliding_window"]} if "sliding_window" in extra else {})
    return kwargs


class MFAQuantizedCache(Cache):
    """A Cache of `MFAQuantizedLayer`s: K/V stored as `format` ("fp8_e4m3", "fp8_e5m2", "int8" or "nf4").

    format: code format; residual_length: newest tokens kept in full precision (0: none; else
    quantized in chunks of that many); group_size: nf4 group (32 or 64, default 64); config: the
    model config, for per-layer sliding windows (hybrid models) and to refuse latent caches.
    """

    def __init__(self, format: str = "int8", config=None, residual_length: int = 0, group_size: int | None = None):
        options = dict(format=format, residual_length=residual_length, group_size=group_size)
        MFAQuantizedLayer(**options)  # validate the options now, not at the first forward
        options["step_plans"] = StepPlans()  # one per cache: its layers share each step's decode plan
        self.format, self.residual_length = parse_format(format).value, residual_length
        if config is None:
            super().__init__(layer_class_to_replicate=lambda: MFAQuantizedLayer(**options))
            return
        check_model_config(config)
        layers = [MFAQuantizedLayer(**options, **extra) for extra in _layer_kwargs(config)]
        for head_dim in _stored_head_dims(config.get_text_config(decoder=True), len(layers)):
            check_head_dim_fits_groups(self.format, layers[0].group_size, head_dim)  # what a forward would refuse
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes held by all layers' codes, scales and residuals (capacity included)."""
        return sum(layer.nbytes() for layer in self.layers)
