"""MFAQuantizedCache: generation on every decoder family with fp8/int8/nf4 K/V, the kernel against a
float64 reference on the dequantized cache, beam search, the cache methods moving scales with their
codes, and the refusal of DeepSeek-V3's latent cache."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from conftest import twin_models
from families import BY_NAME, DECODERS

from mfa_hf import trace
from mfa_hf.integrations.transformers import cache_kwargs, decode
from mfa_hf.integrations.transformers.quantized_cache import (
    MFAQuantizedCache,
    QuantizedCacheError,
    QuantizedCacheView,
)
from mfa_hf.testing import assert_close_to_reference

FORMATS = ("int8", "fp8_e4m3", "fp8_e5m2", "nf4")
KV_DECODERS = [f for f in DECODERS if f.name != "deepseek_v3"]
NEW_TOKENS = 4


def _config(family, fmt: str):
    """The family's tiny config; nf4 needs a head dim that is a multiple of its group (32)."""
    config = family.config()
    if fmt == "nf4":
        for name in ("hidden_size", "n_embd", "word_embed_proj_dim"):
            if hasattr(config, name) and name in config.to_dict():
                setattr(config, name, 128)
        if getattr(config, "head_dim", None) is not None:
            config.head_dim = 32
    return config


def _model(family, fmt: str, implementation: str = "mps_flash"):
    torch.manual_seed(0)
    model = family.model_cls(_config(family, fmt)).eval()
    model.set_attn_implementation(implementation)
    return model


def _inputs(batch: int = 2, seq: int = 7):
    """Random prompts; row 1 left-padded by 2 (batched generate)."""
    ids = torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _decode_calls(calls) -> int:
    return sum(n for (_, op), n in trace.served_by(calls).items() if op == "decode")


def _generate(model, cache, batch: int = 2, **kwargs):
    ids, mask = _inputs(batch)
    with torch.no_grad(), trace.capture() as calls:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             **cache_kwargs(cache), pad_token_id=0, **kwargs)
    return out, calls


def _group(fmt):
    return 32 if fmt == "nf4" else None


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", KV_DECODERS, ids=lambda f: f.name)
def test_generate_every_decoder_family(family, fmt):
    model = _model(family, fmt)
    cache = MFAQuantizedCache(fmt, config=model.config, group_size=_group(fmt))
    out, calls = _generate(model, cache)
    assert out.shape == (2, 7 + NEW_TOKENS)
    layers = model.config.num_hidden_layers
    # Every decode step of every layer ran on the decode op over the quantized store.
    assert _decode_calls(calls) == layers * (NEW_TOKENS - 1) * 2  # two padding groups a step
    assert any(f"kv={fmt}" in key[-1] for key in calls)
    assert cache.get_seq_length() == 7 + NEW_TOKENS - 1


@pytest.mark.slow
@pytest.mark.parametrize("residual", [0, 3])
@pytest.mark.parametrize("implementation", ["mps_flash", "mfa"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", KV_DECODERS, ids=lambda f: f.name)
def test_generate_sweep(family, fmt, implementation, residual):
    model = _model(family, fmt, implementation)
    cache = MFAQuantizedCache(fmt, config=model.config, residual_length=residual, group_size=_group(fmt))
    out, calls = _generate(model, cache)
    assert out.shape == (2, 7 + NEW_TOKENS) and _decode_calls(calls) > 0


# ---------------------------------------------------------------------------------------------
# Kernel output against a float64 reference on exactly what the cache holds.


def _reference(query, key, value, pads, scaling, window, softcap, sinks, dtype):
    """Eager attention in `dtype` over dequantized K/V (B, Hkv, L, D); bottom-right causal."""
    q, k, v = (t.to(dtype) for t in (query, key, value))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    lq, lk = q.shape[2], k.shape[2]
    rows = torch.arange(lq)[:, None] + lk - lq
    cols = torch.arange(lk)[None, :]
    keep = cols <= rows
    if window is not None:
        keep &= cols > rows - window
    keep = keep[None, None] & (cols[None, None] >= pads[:, None, None, None])
    scores = scores.masked_fill(~keep, -math.inf)
    if sinks is not None:
        sink = sinks.to(dtype)[None, :, None, None].expand(*scores.shape[:3], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ v).transpose(1, 2)


@pytest.mark.parametrize("residual", [0, 3])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt_oss", "qwen2"])
def test_kernel_matches_reference_on_dequantized_cache(monkeypatch, name, fmt, residual):
    """Every decode call with a handle is recomputed in float64 on handle.dequantize() (tight bound)."""
    checked = _generate_checked(monkeypatch, name, fmt, residual)
    assert any(checked) == bool(residual)  # the residual part really took part


@pytest.mark.parametrize("batch", [1, 2], ids=["one-row", "left-padded"])
@pytest.mark.parametrize("residual", [0, 3])
@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt_oss", "qwen2"])
def test_int8_integer_products_in_model_layers(monkeypatch, name, residual, batch):
    """The CPU integer-product path (kernels/torch/cpu_int8_products.py, which serves long caches of D >= 64 where
    torch's integer matmul is oneDNN's) with its gate opened for a tiny model's short cache: every decode layer
    (windows, sinks, softcap, a residual part) still matches the float64 reference, and the path really served,
    also for a left-padded batch (its rows grouped by padding reach the path through cache_batch_idx)."""
    from mfa_hf.kernels.torch import cpu_int8_products

    monkeypatch.setattr(cpu_int8_products, "int_mm_is_fast", lambda: True)
    for name_, value in (("MIN_KEYS", 1), ("MIN_HEAD_DIM", 8), ("MAX_ITEMS", 1 << 20)):
        monkeypatch.setattr(cpu_int8_products, name_, value)
    served = []
    original_parts = cpu_int8_products.parts
    monkeypatch.setattr(cpu_int8_products, "parts", lambda *args: served.append(1) or original_parts(*args))
    _generate_checked(monkeypatch, name, "int8", residual, batch=batch)
    assert bool(served) == (name != "gemma2")  # gemma2's softcap takes the block loop (decode.py)


def _generate_checked(monkeypatch, name, fmt, residual, batch: int = 2) -> list[int]:
    """Generate with the family's tiny model; every decode call with a handle is recomputed in float64 on
    handle.dequantize() (tight bound). Returns each checked call's residual length."""
    checked = _check_every_call(monkeypatch, name, fmt)
    model = _model(BY_NAME[name], fmt)
    cache = MFAQuantizedCache(fmt, config=model.config, residual_length=residual, group_size=_group(fmt))
    _generate(model, cache, batch=batch)
    assert len(checked) == model.config.num_hidden_layers * (NEW_TOKENS - 1)
    return checked


def _check_every_call(monkeypatch, name, fmt) -> list[int]:
    """From now on every attention call over the cache's handles is recomputed in float64 on handle.dequantize();
    the list returned fills with each checked call's residual length."""
    original, checked = decode.quantized_attention, []

    def checking(module, query, key, value, attention_mask, **kw):
        out = original(module, query, key, value, attention_mask, **kw)
        pads = torch.zeros(query.shape[0], dtype=torch.long) if attention_mask is None else \
            decode._left_pads(attention_mask, query.shape[0], key.shape[2], query.shape[2])
        args = (query, key.dequantize(), value.dequantize(), pads, kw["scaling"], kw["sliding_window"],
                kw["softcap"], kw["s_aux"])
        assert_close_to_reference(out, _reference(*args, torch.float64), _reference(*args, query.dtype),
                                  name=f"{name} {fmt} layer {module.layer_idx}")
        checked.append(key.residual_length)
        return out

    monkeypatch.setattr(decode, "quantized_attention", checking)
    return checked


@pytest.mark.parametrize("residual", [4, 6, 9])
@pytest.mark.parametrize("name", ["gemma2", "gpt_oss", "qwen2"])
def test_several_token_steps_over_a_residual_longer_than_the_window(monkeypatch, name, residual):
    """A second turn that feeds several tokens against the stored cache (or assisted decoding's candidates) when
    the residual holds more keys than the window reaches back (window 4): only the first query rows see the
    quantized prefix. It was refused with the kernels' words ('a left span shorter than the residual keys'), for
    gpt-oss's default window and residual (128 both) too. Every call matches the float64 reference."""
    checked = _check_every_call(monkeypatch, name, "int8")
    model = _model(BY_NAME[name], "int8")
    cache = MFAQuantizedCache("int8", config=model.config, residual_length=residual)
    ids = torch.randint(3, 128, (1, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
        turn = torch.cat([first, torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(6))], 1)
        model.generate(turn, max_new_tokens=2, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    assert max(checked) > 4, "the residual never outgrew the window: the case is not exercised"


def _stepwise_logits(reference, model, cache, steps: int = 3):
    """Last-position logits of `steps` one-token decode steps (left-padded batch) and eager's on the
    whole sequence."""
    ids, mask = _inputs()
    new = torch.randint(3, 128, (2, steps), generator=torch.Generator().manual_seed(4))
    full, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        expected = reference(full, attention_mask=full_mask).logits[:, -steps:]
        model(ids, attention_mask=mask, **cache_kwargs(cache))
        actual = [model(new[:, i:i + 1], attention_mask=full_mask[:, : ids.shape[1] + i + 1],
                        **cache_kwargs(cache)).logits[:, -1] for i in range(steps)]
    return torch.stack(actual, 1), expected


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt_oss", "qwen2"])
def test_residual_covering_everything_equals_eager(name):
    """All tokens in the full-precision residual: the decode path (padding as a per-row window,
    sinks after the merge, softcap, sliding windows) must equal eager to fp32 tolerance."""
    reference, model = twin_models(BY_NAME[name], "mps_flash")
    actual, expected = _stepwise_logits(reference, model, MFAQuantizedCache("int8", config=model.config,
                                                                            residual_length=64))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("residual", [0, 4])
@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt_oss", "qwen2"])
def test_int8_logits_close_to_eager(name, residual):
    """int8 K/V moves tiny-model logits by < 1e-2 (measured <= 5e-3): positions and masks are right."""
    reference, model = twin_models(BY_NAME[name], "mps_flash")
    actual, expected = _stepwise_logits(reference, model, MFAQuantizedCache("int8", config=model.config,
                                                                            residual_length=residual))
    torch.testing.assert_close(actual, expected, atol=1e-2, rtol=0)


# ---------------------------------------------------------------------------------------------
# Cache manipulation: beam search, crop, select, repeat; sliding layers; memory.


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_beam_search(name):
    model = _model(BY_NAME[name], "int8")
    out, calls = _generate(model, MFAQuantizedCache("int8", config=model.config), num_beams=2)
    assert out.shape == (2, 7 + NEW_TOKENS) and _decode_calls(calls) > 0


def _filled_layer(fmt="int8", residual=0, batch=3, tokens=9):
    cache = MFAQuantizedCache(fmt, residual_length=residual, group_size=_group(fmt))
    k = torch.randn(batch, 2, tokens, 32)
    cache.update(k, -k, 0)
    cache.update(torch.randn(batch, 2, 1, 32), torch.randn(batch, 2, 1, 32), 0)
    return cache, cache.layers[0]


def _rows(layer):
    view = layer.k.view()
    return view.dequantize(), view.quantized.scales[:, : view.length].clone()


@pytest.mark.parametrize("residual", [0, 4])
def test_reorder_select_repeat_move_scales_with_codes(residual):
    cache, layer = _filled_layer(residual=residual)
    values, scales = _rows(layer)
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    after, after_scales = _rows(layer)
    torch.testing.assert_close(after, values[[2, 0, 1]], rtol=0, atol=0)
    torch.testing.assert_close(after_scales, scales[[2, 0, 1]], rtol=0, atol=0)
    cache.batch_select_indices(torch.tensor([1, 2]))
    torch.testing.assert_close(_rows(layer)[0], values[[0, 1]], rtol=0, atol=0)
    cache.batch_repeat_interleave(2)
    torch.testing.assert_close(_rows(layer)[0], values[[0, 0, 1, 1]], rtol=0, atol=0)
    # V was stored as -K for the prompt (int8 is symmetric): its codes and scales moved the same way.
    torch.testing.assert_close(layer.v.view().dequantize()[:, :, :9], -_rows(layer)[0][:, :, :9], rtol=0, atol=0)


@pytest.mark.parametrize("residual", [0, 4])
def test_crop_removes_newest_tokens(residual):
    cache, layer = _filled_layer(residual=residual)
    values, _ = _rows(layer)
    cache.crop(-3)
    assert cache.get_seq_length() == 7
    torch.testing.assert_close(_rows(layer)[0], values[:, :, :7], rtol=0, atol=0)
    with pytest.raises(ValueError, match="crop: expected a negative"):
        cache.crop(5)


@pytest.mark.parametrize("residual", [0, 4])
def test_crop_into_a_trimmed_window_is_refused_and_short_of_it_is_exact(residual):
    """A sliding layer that dropped its oldest tokens (its buffer filled) keeps only its window: a crop that left
    the next query fewer earlier keys than the window sees gave wrong logits silently (session 25). Every crop
    either leaves a next token whose logits match a fresh forward over the same tokens, or is refused."""
    model = _model(BY_NAME["mistral"], "int8")  # sliding_window 4 on every layer
    window = model.config.sliding_window
    ids = torch.randint(3, 128, (1, 272), generator=torch.Generator().manual_seed(5))
    outcomes = set()
    for spare in (window, 1, 0, -1, -3):  # stored tokens left beyond the window's window - 1 earlier ones
        cache = MFAQuantizedCache("int8", config=model.config, residual_length=residual)
        with torch.no_grad():
            model(ids[:, :250], **cache_kwargs(cache))
            for position in range(250, 270):  # past the first 256-token buffer: the sliding layers are trimmed
                model(ids[:, position:position + 1], **cache_kwargs(cache))
            held = cache.layers[0].k.length + cache.layers[0].k.residual_length
            assert held < 270  # trimmed
            remove = held - (window - 1) - spare
            try:
                cache.crop(-remove)
            except RuntimeError as error:
                assert "sliding window" in str(error) and "dropped" in str(error) and spare < 0
                outcomes.add("refused")
                continue
            kept = 270 - remove
            step = model(ids[:, kept:kept + 1], **cache_kwargs(cache)).logits[0, -1]
            fresh = model(ids[:, :kept + 1]).logits[0, -1]
        assert float((step - fresh).abs().max()) < 0.05, remove  # int8 noise (a dropped key: 0.15-0.4)
        outcomes.add("exact")
        assert spare >= 0
    assert outcomes == {"refused", "exact"}


def test_residual_is_quantized_in_chunks():
    cache, layer = _filled_layer(residual=4, tokens=9)  # 9 prefill in residual, then a decode step
    assert (layer.k.length, layer.k.residual_length) == (8, 2)  # two chunks of 4 flushed, 1 + 1 left
    assert layer.get_mask_sizes(1) == (11, 0)


def test_sliding_layers_keep_only_their_window():
    model = _model(BY_NAME["gemma2"], "int8")  # sliding_window 4 on alternating layers
    cache = MFAQuantizedCache("int8", config=model.config)
    assert [layer.is_sliding for layer in cache.layers] == [True, False]
    layer = cache.layers[0]
    for step in range(300):  # past the first buffer (256 tokens): the window moves to the front
        k = torch.randn(1, 2, 1, 16)
        kv_length, kv_offset = layer.get_mask_sizes(1)
        view = cache.update(k, k, 0)[0]
        cache.update(k, k, 1)
        assert (view.shape[2], kv_offset + kv_length) == (kv_length, step + 1)
    assert layer.k.buffer.shape[1] == 256 and layer.k.length < 256
    assert cache.layers[1].k.length == 300


def test_memory_per_token():
    cache, layer = _filled_layer(fmt="nf4", tokens=255, batch=1)
    codes = layer.k.buffer.codes
    # nf4 with group 32 over D = 32: 16 code bytes + one float32 scale per (token, head)
    assert codes.shape[-1] == 16 and layer.k.buffer.scales.shape[-1] == 1
    assert layer.nbytes() == 2 * 256 * 2 * (16 + 4)


# ---------------------------------------------------------------------------------------------
# Refusals with clear messages.


def test_deepseek_v3_latent_cache_is_refused():
    config = BY_NAME["deepseek_v3"].config()
    with pytest.raises(ValueError, match="deepseek_v3.*latent"):
        MFAQuantizedCache("int8", config=config)


@pytest.mark.parametrize("model_type", ["t5", "mt5", "umt5", "switch_transformers", "longt5"])
def test_relative_position_bias_models_are_refused_at_construction(model_type):
    """T5's family adds a learned position_bias to the scores, which the quantized decode kernel does not take:
    the cache was accepted and every generate failed at its first decode step (session 25)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, d_model=32, d_kv=8, num_heads=4, num_layers=1, d_ff=32, vocab_size=64)
    with pytest.raises(ValueError, match=rf"{model_type}.*relative position bias.*DynamicCache"):
        MFAQuantizedCache("int8", config=config)


@pytest.mark.parametrize("residual", [0, 4])
@pytest.mark.parametrize("rows", [1, 3])
def test_a_batch_of_another_size_is_refused_and_changes_nothing(residual, rows):
    """A later update with another batch size than the stored tokens: a kernel's words (k_cache, cache_batch_idx)
    or torch.cat's, after part of the residual was already quantized (session 25). Now the cache's own error, and
    the layer as it was."""
    cache, layer = _filled_layer(residual=residual, batch=2)
    before = (layer.k.length, layer.k.residual_length, cache.get_seq_length())
    with pytest.raises(ValueError, match=rf"MFAQuantizedCache.update: expected a batch of 2 rows .* got {rows}"):
        cache.update(torch.randn(rows, 2, 1, 32), torch.randn(rows, 2, 1, 32), 0)
    assert (layer.k.length, layer.k.residual_length, cache.get_seq_length()) == before
    cache.update(torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32), 0)  # the right batch still serves


def test_handle_outside_mfa_attention_says_why():
    model = _model(BY_NAME["llama"], "int8", implementation="eager")
    with pytest.raises(QuantizedCacheError, match='attn_implementation="mps_flash" or "mfa"'):
        _generate(model, MFAQuantizedCache("int8"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(format="int4"), "format: expected one of"),
    (dict(format="fp16"), "format: expected one of"),
    (dict(format="int8", residual_length=-1), "residual_length: expected an int >= 0"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MFAQuantizedCache(**kwargs)


@pytest.mark.parametrize("config", ["llama", "model"])
def test_config_must_be_a_model_config(config):
    model = _model(BY_NAME["llama"], "int8")
    with pytest.raises(TypeError, match="config: expected the model's transformers config"):
        MFAQuantizedCache("int8", config=config if config == "llama" else model)


@pytest.mark.parametrize("group_size, head_dim", [(None, 16), (64, 96), (32, 48)])
def test_nf4_groups_that_do_not_divide_the_head_dim_are_refused_at_construction(group_size, head_dim):
    """With the config given, the head dim is known: refused when the cache is made, not at the first forward."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, num_hidden_layers=1)
    with pytest.raises(ValueError, match=f"head_dim: expected a multiple of the nf4 group size {group_size or 64}"):
        MFAQuantizedCache("nf4", config=config, group_size=group_size)
    MFAQuantizedCache("int8", config=config)  # no groups: any head dim


def _bart(implementation="mps_flash"):
    import transformers as tf

    config = tf.BartConfig(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, pad_token_id=1,
                           bos_token_id=0, eos_token_id=127, decoder_start_token_id=2, forced_eos_token_id=None)
    torch.manual_seed(0)
    return tf.BartForConditionalGeneration._from_config(config, attn_implementation=implementation).eval()


def test_encoder_decoder_caches_say_how_to_quantize():
    """An encoder-decoder keeps cross-attention K/V in its cache. One bare quantized cache for both is refused where a
    padded encoder mask shows the mix-up (without one it is as wrong as a bare DynamicCache upstream), naming
    EncoderDecoderCache(MFAQuantizedCache(...), DynamicCache()), which serves (the self-attention half quantized)
    with the plain pair's tokens. A quantized cross-attention half serves too: the model reads its K/V back through
    layer.keys/.values, dequantized copies (it was refused while those were None)."""
    from transformers import DynamicCache, EncoderDecoderCache

    model = _bart()
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(1))
    padded = torch.ones_like(ids)
    padded[1, 8:] = 0
    kwargs = dict(input_ids=ids, max_new_tokens=6, do_sample=False)
    quantized = lambda: MFAQuantizedCache("int8", config=model.config)  # noqa: E731
    for bare in (model, _bart("mfa")):
        with pytest.raises(NotImplementedError,
                           match=r"EncoderDecoderCache\(MFAQuantizedCache\(\.\.\.\), DynamicCache\(\)\)"):
            with torch.no_grad():
                bare.generate(**kwargs, attention_mask=padded, **cache_kwargs(quantized()))
    with torch.no_grad():
        with trace.capture() as calls:
            served = model.generate(**kwargs, **cache_kwargs(EncoderDecoderCache(quantized(), DynamicCache())))
        plain = model.generate(**kwargs, **cache_kwargs(EncoderDecoderCache(DynamicCache(), DynamicCache())))
        both = model.generate(**kwargs, attention_mask=padded,
                              **cache_kwargs(EncoderDecoderCache(quantized(), quantized())))
        plain_padded = model.generate(**kwargs, attention_mask=padded,
                                      **cache_kwargs(EncoderDecoderCache(DynamicCache(), DynamicCache())))
    assert _decode_calls(calls) > 0 and torch.equal(served, plain)
    assert torch.equal(both, plain_padded)


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "nf4"])
@pytest.mark.parametrize("residual", [0, 4])
def test_layer_keys_and_values_read_as_a_dynamic_layers(fmt, residual):
    """Code outside attention reads `layer.keys` / `layer.values` (Whisper's generate, cross-attention reuse,
    mllama): they were None. Now the stored tokens as a DynamicLayer holds them, dequantized, read-only."""
    fresh = MFAQuantizedCache(fmt, group_size=_group(fmt))
    assert fresh.layers == [] or fresh.layers[0].keys is None
    cache, layer = _filled_layer(fmt, residual=residual)
    for states, store in ((layer.keys, layer.k), (layer.values, layer.v)):
        assert states.shape == (3, 2, 10, 32) and states.dtype == torch.float32
        torch.testing.assert_close(states, store.view().dequantize(), rtol=0, atol=0)
    with pytest.raises(AttributeError, match="MFAQuantizedLayer.keys is read-only"):
        layer.keys = torch.zeros(3, 2, 10, 32)


@pytest.mark.parametrize("implementation", ["mfa", "mps_flash"])
def test_whisper_generate_with_return_dict_and_the_quantized_self_attention_cache(implementation):
    """Whisper's short-form generate with return_dict_in_generate splits the cache per row through
    layer.keys[row]: TypeError on the documented EncoderDecoderCache(MFAQuantizedCache(...), DynamicCache())."""
    import transformers as tf
    from transformers import DynamicCache, EncoderDecoderCache

    config = tf.WhisperConfig(vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=2,
                              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                              decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=16, max_target_positions=64,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                              begin_suppress_tokens=None, suppress_tokens=None)
    torch.manual_seed(0)
    model = tf.WhisperForConditionalGeneration._from_config(config, attn_implementation=implementation).eval()
    features = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    kwargs = dict(input_features=features, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                  output_scores=True)
    with torch.no_grad():
        plain = model.generate(**kwargs, **cache_kwargs(EncoderDecoderCache(DynamicCache(), DynamicCache())))
        with trace.capture() as calls:
            quantized = model.generate(**kwargs, **cache_kwargs(
                EncoderDecoderCache(MFAQuantizedCache("int8", config=model.config), DynamicCache())))
    assert _decode_calls(calls) > 0
    assert torch.equal(quantized.sequences, plain.sequences)


def test_plain_decode_steps_use_the_decode_op():
    """Item 5 for plain caches: a one-token step against cached K/V runs on the decode op."""
    reference, model = twin_models(BY_NAME["mistral"], "mfa")
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), trace.capture() as calls:
        actual = model.generate(ids, max_new_tokens=5, do_sample=False)
    expected = reference.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(actual, expected)
    assert _decode_calls(calls) == model.config.num_hidden_layers * 4


def test_views_are_not_copies():
    _, layer = _filled_layer()
    view = layer.k.view()
    assert isinstance(view, QuantizedCacheView)
    assert view.quantized.codes.data_ptr() == layer.k.buffer.codes.data_ptr()
    copy.copy(view)  # frozen dataclass: cheap to hand around


# ---------------------------------------------------------------------------------------------
# Host reads: on mps/cuda every read of a device tensor by the host waits for the device.

HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique")


# Code that reads the host on the CPU alone, where a read waits for nothing: the CPU native route's checks that q
# is finite and that no row met an infinite score (mfa_hf/native.py, CPU plain-eager calls only;
# tests/test_native_routes.py checks they read nothing off the CPU).
CPU_ONLY_READERS = {("mfa_hf.native", "_nonfinite_rows_restored"), ("mfa_hf.native", "_infinite_score_rows_restored")}


def _in_cpu_backend() -> bool:
    """True when called from the torch backend's kernels (the CPU fallback sizes its loops from host values,
    free on the CPU; the GPU backends read lengths on the device) or from a CPU-only reader."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("mfa_hf.kernels.torch") or (module, frame.f_code.co_name) in CPU_ONLY_READERS:
            return True
        frame = frame.f_back
    return False


def _count_host_reads(monkeypatch, *entries: str) -> list[int]:
    """Patch Tensor's host-read methods and decode.<entry> for each entry: the reads made inside each
    call of them by the integration and the public API (not by the CPU backend's kernels)."""
    reads, inside, per_call = [0], [False], []
    for name in HOST_READS:
        def counting(self, *args, _original=getattr(torch.Tensor, name), **kwargs):
            if inside[0] and not _in_cpu_backend():
                reads[0] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    for entry in entries:
        def counted(*args, _original=getattr(decode, entry), **kwargs):
            inside[0], start = True, reads[0]
            try:
                return _original(*args, **kwargs)
            finally:
                inside[0] = False
                per_call.append(reads[0] - start)

        monkeypatch.setattr(decode, entry, counted)
    return per_call


@pytest.mark.parametrize("fmt", [None, "int8"])
def test_decode_steps_do_not_read_back_per_layer(monkeypatch, fmt):
    """Plain and quantized caches. No padding: no decode call reads a device tensor back (lengths travel
    as host ints). Left padding: the mask is analysed once per step (first layer), the other layers reuse
    it."""
    model = _model(BY_NAME["llama"], fmt or "int8")
    layers = model.config.num_hidden_layers
    entries = ("plain_decode", "padded_plain_decode") if fmt is None else ("quantized_attention",)
    per_call = _count_host_reads(monkeypatch, *entries)
    for batch, padded in ((1, False), (2, True)):
        per_call.clear()
        ids, mask = _inputs(batch)
        cache = None if fmt is None else MFAQuantizedCache(fmt, config=model.config)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                           **cache_kwargs(cache), pad_token_id=0)
        assert len(per_call) == layers * (NEW_TOKENS - 1), per_call
        steps = [per_call[i:i + layers] for i in range(0, len(per_call), layers)]
        assert all(sum(step[1:]) == 0 for step in steps), f"layers after the first read back: {steps}"
        if not padded:
            assert sum(per_call) == 0, f"host reads without padding: {steps}"


def test_mask_facts_are_computed_once_per_mask_object():
    from mfa_hf.integrations.transformers.step import once_per_mask

    calls = []
    mask = torch.ones(2, 5, dtype=torch.bool)

    def all_valid(m):
        calls.append(1)
        return bool(m.all())

    assert once_per_mask(mask, ("all",), lambda: all_valid(mask)) is True
    assert once_per_mask(mask, ("all",), lambda: all_valid(mask)) is True
    assert len(calls) == 1, "the same mask object and question must reuse the answer"
    other = mask.clone()
    assert once_per_mask(other, ("all",), lambda: all_valid(other)) is True and len(calls) == 2
    mask[0, 0] = False  # in place: the version counter moves, the answer must be recomputed
    assert once_per_mask(mask, ("all",), lambda: all_valid(mask)) is False and len(calls) == 3
    assert once_per_mask(mask, ("other question",), lambda: all_valid(mask)) is False and len(calls) == 4


def test_capacity_grows_by_a_quarter_in_blocks():
    from mfa_hf.integrations.transformers.quantized_cache import grown_capacity

    assert grown_capacity(0, 1) == 256 and grown_capacity(0, 300) == 512
    capacity, reallocations = 0, 0
    for needed in range(1, 20_001):
        if needed > capacity:
            capacity, reallocations = grown_capacity(capacity, needed), reallocations + 1
        assert capacity % 256 == 0 and capacity >= needed
        assert capacity <= max(256, 1.25 * needed + 256), (needed, capacity)  # spare room bounded
    assert reallocations <= 25, "growth must stay geometric (amortized O(1) appends)"


@pytest.mark.parametrize("fmt", [None, "int8"])
def test_padded_generate_under_inference_mode(fmt):
    """Inference tensors have no version counter: the mask facts are recomputed, not reused, and the
    tokens equal those generated under no_grad."""
    model = _model(BY_NAME["llama"], fmt or "int8")
    ids, mask = _inputs(2)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    new_cache = (lambda: None) if fmt is None else (lambda: MFAQuantizedCache(fmt, config=model.config))
    with torch.no_grad():
        expected = model.generate(ids, **cache_kwargs(new_cache()), **kwargs)
    with torch.inference_mode():
        actual = model.generate(ids, **cache_kwargs(new_cache()), **kwargs)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("states", ["3-D", "list"])
def test_update_with_states_that_are_not_4d_names_them(states):
    """A 3-D state gave 'not enough values to unpack (expected 4, got 3)' from inside the store."""
    from mfa_hf.integrations.transformers.quantized_cache import MFAQuantizedCache

    cache = MFAQuantizedCache(format="int8")
    bad = torch.randn(1, 4, 8) if states == "3-D" else [[0.0]]
    with pytest.raises(ValueError, match=r"update: key_states: expected a 4-D tensor \(B, H, S, D\)"):
        cache.update(bad, torch.randn(1, 2, 4, 8), 0)
