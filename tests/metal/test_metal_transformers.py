"""Acceptance: a tiny transformers model generating with attn_implementation="mps_flash", with an
MFAQuantizedCache or a plain cache and a left-padded row, has every attention call (prefill forward,
decode steps) served by the metal backend (CPU tensors through the emulator; mps on a Mac)."""

import pytest
import torch

from mfa_hf import trace

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "nf4", None])
def test_generate_is_served_by_metal(fmt, metal, monkeypatch, no_native_routes):
    """fmt None: the plain cache, with a left-padded row (varlen prefill, padded decode steps)."""
    from mfa_hf.integrations.transformers import cache_kwargs  # (registers mps_flash)
    from mfa_hf.integrations.transformers.quantized_cache import MFAQuantizedCache

    if metal.is_emulated:
        monkeypatch.setenv("MFA_METAL_EMULATOR", "1")
    monkeypatch.delenv("MFA_BACKEND", raising=False)  # auto: metal must be the first choice by itself
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval().to(metal.device)
    model.set_attn_implementation("mps_flash")
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1)).to(metal.device)
    mask = torch.ones_like(ids)
    cache = None
    if fmt is None:
        mask[1, :2] = 0
    else:
        cache = MFAQuantizedCache(fmt, config=model.config, group_size=32 if fmt == "nf4" else None)
    with torch.no_grad(), trace.capture() as calls:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                             **cache_kwargs(cache), pad_token_id=0)
    served = trace.served_by(calls)
    assert out.shape == (2, 9)
    others = {key: n for key, n in served.items() if key[0] != "metal" and n}
    assert not others, f"calls served by another backend: {others}"
    assert served[("metal", "decode")] >= 2 * config.num_hidden_layers, dict(served)
