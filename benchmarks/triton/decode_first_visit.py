"""Decode steps at key lengths seen for the first time against the same lengths seen again (issue 19).

    PYTHONPATH=. python benchmarks/triton/decode_first_visit.py sdpa            # SDPA's own backend choice
    PYTHONPATH=. python benchmarks/triton/decode_first_visit.py mps_flash
    PYTHONPATH=. python benchmarks/triton/decode_first_visit.py sdpa --no-cudnn

A Llama-3.2-1B-shaped model (bf16, random weights) prefills 8192 tokens, then runs 16 one-token steps; a second
cache repeats the same lengths. Every generated token of a real generation is a first visit. On torch 2.11 cuda,
SDPA's own choice for a one-row decode is cuDNN, which builds a graph per new key length: the first visit pays it
(session 13, H100: 52.5 ms a step against 11.1 on the second visit and 10.6 with cuDNN off). Prints ms per step for
both visits and the SDPA kernels one step ran. Run each implementation in its own process (a graph built by one
would serve the other).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from mfa_hf.integrations.transformers import cache_kwargs  # importing registers "mps_flash"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("attn", choices=("sdpa", "mps_flash", "eager"))
    parser.add_argument("--no-cudnn", action="store_true", help="disable SDPA's cuDNN backend")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    if args.no_cudnn:
        torch.backends.cuda.enable_cudnn_sdp(False)
    config = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.context), device="cuda")
    visits = []
    with torch.inference_mode():
        lm.generate(ids[:, :256], attention_mask=torch.ones_like(ids[:, :256]), max_new_tokens=4, do_sample=False,
                    pad_token_id=0)  # library init and kernel compilation stay out of the timing
        for _ in range(2):
            cache, mask = DynamicCache(config=lm.config), torch.ones_like(ids)
            token = lm(ids, attention_mask=mask, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                mask = torch.cat([mask, mask[:, :1]], 1)
                logits = lm(token, attention_mask=mask, **cache_kwargs(cache), use_cache=True).logits
                token = logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            visits.append((time.perf_counter() - start) / args.steps * 1e3)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            lm(token, attention_mask=torch.cat([mask, mask[:, :1]], 1), **cache_kwargs(cache), use_cache=True)
            torch.cuda.synchronize()
    kernels = sorted({e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product_")})
    print(f"{args.attn}{' (cuDNN off)' if args.no_cudnn else ''}, {torch.cuda.get_device_name()}, torch "
          f"{torch.__version__}: first visit {visits[0]:.1f} ms a step, second {visits[1]:.1f}; ran {kernels}",
          flush=True)


if __name__ == "__main__":
    main()
