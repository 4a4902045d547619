"""Decode of sdpa and mps_flash models alternating in one process, on CPU: a check of e2e_generate.py's rows.

    PYTHONPATH=. python benchmarks/cpu_alternating_decode.py [--context 1024] [--tokens 24] [--rounds 5]

e2e_generate.py runs each row in its own subprocess, round-robin; on a noisy 2-core host its 1k mps_flash decode
row read 0.90-0.99x sdpa between runs of the same code. Here both models (smollm-135m-shaped, float32, the same
random weights) live in one process and take turns, the order flipped every round: each turn prefills --context
tokens into a fresh DynamicCache (untimed), then times --tokens greedy tokens. Prints ms a token (median, fastest,
every round) and the ratio of medians. Session 14, 1k: mps_flash 60.3 ms a token, sdpa 60.4 (5 rounds).
"""

from __future__ import annotations

import argparse
import time

import torch
from interleaved import print_header, summary  # benchmarks/interleaved.py, beside this file
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from mfa_hf.integrations.transformers import cache_kwargs  # importing registers "mps_flash"

SMOLLM = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
              intermediate_size=1536, vocab_size=49152, max_position_embeddings=131072, rope_theta=500000.0,
              tie_word_embeddings=True)
GREEDY = dict(do_sample=False, pad_token_id=0)


def seconds_a_token(lm, ids: torch.Tensor, tokens: int) -> float:
    cache = DynamicCache(config=lm.config)
    prompt = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, **cache_kwargs(cache), **GREEDY)
    start = time.perf_counter()
    lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens, min_new_tokens=tokens,
                **cache_kwargs(cache), **GREEDY)
    return (time.perf_counter() - start) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    config = LlamaConfig(**SMOLLM)
    models = {}
    for attn in ("sdpa", "mps_flash"):
        torch.manual_seed(0)  # the same weights for both
        models[attn] = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.context))
    samples = {attn: [] for attn in models}
    with torch.inference_mode():
        for lm in models.values():  # warm-up: library init stays out of the rounds
            lm.generate(ids[:, :64], attention_mask=torch.ones_like(ids[:, :64]), max_new_tokens=3, **GREEDY)
        for round_index in range(args.rounds):
            order = list(models) if round_index % 2 == 0 else list(reversed(models))
            for attn in order:
                samples[attn].append(seconds_a_token(models[attn], ids, args.tokens))
    print_header(f"decode after a {args.context}-token prompt, {args.tokens} tokens a round", args.rounds,
                 ("attn", "ms a token, median", "fastest", "x sdpa time", "rounds"))
    for name, median, fastest, ratio in summary(samples):
        rounds = ", ".join(f"{s * 1e3:.1f}" for s in samples[name])
        print(f"| {name} | {median * 1e3:.1f} | {fastest * 1e3:.1f} | {ratio:.3f} | {rounds} |")


if __name__ == "__main__":
    main()
