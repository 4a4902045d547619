"""Decode of several paths alternating in one process, on CPU: a check of e2e_generate.py's rows.

    PYTHONPATH=. python benchmarks/cpu_alternating_decode.py [--context 1024] [--tokens 24] [--rounds 5]
        [--paths sdpa mps_flash mps_flash:int8 sdpa:hf_hqq ...]

e2e_generate.py runs each row in its own subprocess, round-robin; on a noisy 2-core host its rows move between
processes more than the paths differ (session 24, 8k: the int8 cache's decode runs spread 7.1-9.3 tok/s, sdpa's
7.6-8.7). Here every path (`attn` or `attn:kv cache`, the kv caches of e2e_generate.py; smollm-135m-shaped,
float32, the same random weights) lives in one process with its own model and cache. Each prefills --context
tokens and decodes two once (untimed); then, round after round with the order flipped every round, each generates
--tokens more greedy tokens on its own cache (a round grows every cache by the same count: the paths see the same
lengths). Prints ms a token (median, fastest, every round) and the ratio of medians against sdpa's.
Session 14, 1k: mps_flash 60.3 ms a token, sdpa 60.4 (5 rounds).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from e2e_generate import SHAPES, make_cache, missing_package  # benchmarks/, beside this file
from interleaved import print_header, summary
from transformers import AutoModelForCausalLM, LlamaConfig

from mfa_hf.integrations.transformers import cache_kwargs  # importing registers "mps_flash"

GREEDY = dict(do_sample=False, pad_token_id=0)


class Path:
    """One path's model and cache, and the sequence it has generated so far."""

    def __init__(self, name: str, config: LlamaConfig, ids: torch.Tensor):
        attn, _, self.kind = name.partition(":")
        config = copy.deepcopy(config)  # from_config sets the attention implementation on the config it is given
        torch.manual_seed(0)  # the same weights for every path
        self.lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()
        self.cache = make_cache(self.kind or "none", self.lm.config)
        # the prefill and two decode steps, untimed: a cache's first steps load and build (quanto's first round
        # took 8.5 s a token)
        self.sequence = self.generate(ids, 3)

    def generate(self, ids: torch.Tensor, tokens: int) -> torch.Tensor:
        return self.lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                min_new_tokens=tokens, **cache_kwargs(self.cache), **GREEDY)

    def seconds_a_token(self, tokens: int) -> float:
        start = time.perf_counter()
        self.sequence = self.generate(self.sequence, tokens)
        return (time.perf_counter() - start) / tokens


def _installed(path: str) -> bool:
    """Whether the package behind a path's cache is installed (transformers' quantized caches need theirs)."""
    missing = missing_package(path.partition(":")[2])
    if missing:
        print(f"# {path}: left out, {missing} is not installed")
    return missing is None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--paths", nargs="+", default=("sdpa", "mps_flash"),
                        help="attn or attn:kv cache (none, int8, nf4, fp8_e4m3, hf_hqq, hf_quanto); sdpa is the "
                             "baseline and always runs")
    args = parser.parse_args()
    config = LlamaConfig(**SHAPES["smollm-135m"], max_position_embeddings=131072, rope_theta=500000.0,
                         tie_word_embeddings=True)
    ids = torch.randint(0, config.vocab_size, (1, args.context))
    names = ["sdpa"] + [name for name in args.paths if name != "sdpa" and _installed(name)]
    with torch.inference_mode():
        paths = {name: Path(name, config, ids) for name in names}
        samples = {name: [] for name in paths}
        for round_index in range(args.rounds):
            order = names if round_index % 2 == 0 else names[::-1]
            for name in order:
                samples[name].append(paths[name].seconds_a_token(args.tokens))
    print_header(f"decode after a {args.context}-token prompt, {args.tokens} tokens a round", args.rounds,
                 ("path", "ms a token, median", "fastest", "x sdpa time", "rounds"))
    for name, median, fastest, ratio in summary(samples):
        rounds = ", ".join(f"{s * 1e3:.1f}" for s in samples[name])
        print(f"| {name} | {median * 1e3:.1f} | {fastest * 1e3:.1f} | {ratio:.3f} | {rounds} |")


if __name__ == "__main__":
    main()
