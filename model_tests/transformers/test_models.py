"""Per-family conformance: eager vs mfa-hf (both names) on the same weights, fp32 at transformers'
tolerances, left and right padding with padded positions ignored, greedy generate with dynamic and
static caches giving identical tokens, and a check that our kernel served every attention layer."""

from __future__ import annotations

import pytest
import torch
from conftest import BATCH, IMPLEMENTATIONS, assert_close_where, kernel_calls, padded_batch, twin_models
from families import BY_NAME, DECODERS, FAMILIES

from mfa_hf import trace
from mfa_hf.integrations.transformers import cache_kwargs

LAYERS = 2


def _ids(fams):
    return [pytest.param(f, id=f.name) for f in fams]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", _ids(DECODERS))
def test_decoder_padded_forward(family, side, implementation):
    reference, model = twin_models(family, implementation)
    ids, mask = padded_batch(side)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        with trace.capture() as calls:
            actual = model(ids, attention_mask=mask).logits
    assert kernel_calls(calls) >= LAYERS, f"{family.name}: mfa-hf kernel did not run ({trace.served_by(calls)})"
    assert_close_where(actual, expected, mask, what=f"{family.name} logits")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", _ids(DECODERS))
def test_decoder_greedy_generate(family, cache, implementation):
    reference, model = twin_models(family, implementation)
    ids, mask = padded_batch("left")
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    expected = reference.generate(ids, **kwargs)
    with trace.capture() as calls:
        actual = model.generate(ids, **kwargs)
    assert kernel_calls(calls) >= LAYERS * 5, f"{family.name}: kernel ran {trace.served_by(calls)}"
    assert torch.equal(actual, expected), f"{family.name} ({cache}): {actual.tolist()} != {expected.tolist()}"
    # Only the prefill runs the forward op; every layer of the 4 decode steps of the left-padded batch (and
    # the static cache's unfilled tail) runs on the decode op, one call per padding group seen by the layer
    # (3 for full attention; a sliding window may hold no padding), with no K/V gather.
    # DeepSeek-V3's K and V head dims differ (MLA): its decode steps stay on the forward op.
    served = trace.served_by(calls)
    decode_calls = sum(n for (_, op), n in served.items() if op == "decode")
    forward_calls = sum(n for (_, op), n in served.items() if op == "fwd")
    if family.name == "deepseek_v3":
        assert forward_calls == LAYERS * 5 and decode_calls == 0, served
    else:
        assert forward_calls == LAYERS and decode_calls >= LAYERS * 4, f"{family.name}: {served}"


def _static_steps(model, ids, steps: int = 3, compiled_step=None) -> list:
    """Logits of a forward over a StaticCache with no attention_mask (a prefill of `ids`, then `steps` one-token
    steps feeding each argmax), as compiled decode loops call models: keys past the last query are the cache's
    unwritten slots, which no mask tells the attention about."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 7)
    step = model if compiled_step is None else compiled_step
    found = []
    with torch.no_grad():
        logits = model(ids, **cache_kwargs(cache), use_cache=True).logits
        found.append(logits)
        for n in range(steps):
            position = torch.tensor([ids.shape[1] + n])
            logits = step(logits[:, -1:].argmax(-1), **cache_kwargs(cache), use_cache=True,
                          cache_position=position).logits
            found.append(logits)
    return found


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", _ids(DECODERS))
def test_decoder_static_cache_without_mask(family, implementation):
    reference, model = twin_models(family, implementation)
    ids = padded_batch("left")[0][:, 4:]  # no padding: the mask would be all ones, and none is passed
    expected = _static_steps(reference, ids)
    with trace.capture() as calls:
        actual = _static_steps(model, ids)
    assert kernel_calls(calls) >= LAYERS * 4, f"{family.name}: kernel ran {trace.served_by(calls)}"
    for n, (have, want) in enumerate(zip(actual, expected)):
        assert_close_where(have, want, torch.ones(have.shape[:2]), what=f"{family.name} static step {n}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_compiled_static_decode_without_mask(implementation):
    """The same loop with the decode step compiled (the mask is then built while tracing)."""
    reference, model = twin_models(BY_NAME["llama"], implementation)
    ids = padded_batch("left")[0][:, 4:]
    expected = _static_steps(reference, ids)
    torch._dynamo.reset()
    actual = _static_steps(model, ids, compiled_step=torch.compile(model, dynamic=False))
    for n, (have, want) in enumerate(zip(actual, expected)):
        assert_close_where(have, want, torch.ones(have.shape[:2]), what=f"compiled static step {n}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", _ids([BY_NAME["bert"], BY_NAME["modernbert"]]))
def test_encoder_padded_forward(family, implementation):
    reference, model = twin_models(family, implementation)
    ids, mask = padded_batch("right", seq=16)  # 16 > ModernBERT's window of 6: the window matters
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).last_hidden_state
        with trace.capture() as calls:
            actual = model(ids, attention_mask=mask).last_hidden_state
    assert kernel_calls(calls) >= LAYERS
    assert_close_where(actual, expected, mask, what=f"{family.name} hidden states")


def _seq2seq_inputs(family):
    ids, mask = padded_batch("right")
    decoder_ids = padded_batch("left", seq=6)[0][:, :6].clamp(min=3)
    if family.name == "whisper":
        features = torch.randn(BATCH_FEATURES := ids.shape[0], 16, 32, generator=torch.Generator().manual_seed(2))
        return dict(input_features=features), torch.ones(BATCH_FEATURES, 32 // 2), decoder_ids
    return dict(input_ids=ids, attention_mask=mask), mask, decoder_ids


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", _ids([BY_NAME["whisper"], BY_NAME["t5"]]))
def test_seq2seq_forward_and_generate(family, implementation):
    reference, model = twin_models(family, implementation)
    inputs, _, decoder_ids = _seq2seq_inputs(family)
    with torch.no_grad():
        expected = reference(**inputs, decoder_input_ids=decoder_ids).logits
        with trace.capture() as calls:
            actual = model(**inputs, decoder_input_ids=decoder_ids).logits
    assert kernel_calls(calls) >= 3 * LAYERS  # encoder self, decoder self and cross
    assert_close_where(actual, expected, torch.ones(decoder_ids.shape), what=f"{family.name} logits")
    for cache in ("dynamic", "static"):  # no decoder mask: a static cache's unwritten slots must stay unseen
        kwargs = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True,
                      **({"cache_implementation": "static"} if cache == "static" else {}))
        have, want = model.generate(**inputs, **kwargs), reference.generate(**inputs, **kwargs)
        assert torch.equal(have.sequences, want.sequences), f"{family.name} ({cache})"
        for n, (a, b) in enumerate(zip(have.logits, want.logits)):
            assert_close_where(a[:, None], b[:, None], torch.ones(a.shape[0], 1), what=f"{family.name} {cache} {n}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_clip_text_and_vision(implementation):
    reference, model = twin_models(BY_NAME["clip"], implementation)
    ids, mask = padded_batch("right")
    pixels = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        with trace.capture() as calls:
            actual = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert kernel_calls(calls) >= 2 * LAYERS
    assert_close_where(actual.text_model_output.last_hidden_state, expected.text_model_output.last_hidden_state,
                       mask, what="clip text")
    torch.testing.assert_close(actual.image_embeds, expected.image_embeds, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_vit(implementation):
    reference, model = twin_models(BY_NAME["vit"], implementation)
    pixels = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state
        with trace.capture() as calls:
            actual = model(pixel_values=pixels).last_hidden_state
    assert kernel_calls(calls) >= LAYERS
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-4)


def test_every_family_is_covered():
    covered = {f.name for f in DECODERS} | {"bert", "modernbert", "whisper", "t5", "clip", "vit"}
    assert covered == {f.name for f in FAMILIES}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", _ids(DECODERS))
def test_decoder_padded_forward_low_precision(family, implementation, dtype):
    """bf16/fp16 at transformers' own tolerances (bf16 1e-2, fp16 5e-3), left padding ignored."""
    reference, model = twin_models(family, implementation, dtype)
    ids, mask = padded_batch("left")
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        with trace.capture() as calls:
            actual = model(ids, attention_mask=mask).logits
    assert kernel_calls(calls) >= LAYERS, f"{family.name}: mfa-hf kernel did not run ({trace.served_by(calls)})"
    assert_close_where(actual, expected, mask, dtype, what=f"{family.name} {dtype} logits")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gradients_through_a_cached_decode_step_equal_eager(family, implementation):
    """Eval mode with grad enabled (attribution through a generation step): the step's small query over the cache
    is not sent to the decode op, which has no backward, but to the general path; parameter gradients and logits
    equal eager's. Before, the backward failed with torch's 'no autograd formula' error."""
    from transformers import DynamicCache

    reference, model = twin_models(BY_NAME[family], implementation)
    ids, mask = padded_batch("left")
    grads = []
    for lm in (reference, model):
        cache = DynamicCache(config=lm.config)
        with torch.no_grad():
            lm(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], **cache_kwargs(cache), use_cache=True)
        lm.zero_grad()
        logits = lm(input_ids=ids[:, -1:], attention_mask=mask, **cache_kwargs(cache), use_cache=True).logits
        logits.float().pow(2).sum().backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}))
    (want_logits, want), (got_logits, got) = grads
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-4)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_per_sample_gradients_through_functorch_equal_eager(family, implementation, monkeypatch):
    """torch.func's per-sample-gradient recipe (vmap of grad of functional_call) with our attention: each sample's
    parameter gradients equal eager's, with our kernel (not the native route) serving forward and backward.
    Before, torch.func.grad over our op raised torch.library's functorch error."""
    monkeypatch.setenv("MFA_BACKEND", "torch")  # our op: the native route's transforms are torch's own
    reference, model = twin_models(BY_NAME[family], implementation)
    ids, _ = padded_batch("left")
    samples = ids[:, None]  # (samples, 1, seq): one sequence per sample
    grads = []
    for lm in (reference, model):
        params = {n: p.detach() for n, p in lm.named_parameters()}

        def loss(params, x):
            return torch.func.functional_call(lm, params, (x,), {"labels": x}).loss

        with trace.capture() as calls:
            grads.append(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, samples))
        if lm is model:
            served = trace.served_by(calls)
            # once a layer, or once a layer and sample (vmap's per-sample fallback over the op)
            assert {served[("torch", "fwd")], served[("torch", "bwd")]} <= {LAYERS, LAYERS * BATCH}, dict(served)
    want, got = grads
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
