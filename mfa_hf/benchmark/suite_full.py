"""Full suite: what the HTML report plots, sized to finish in minutes on the device at hand.

    python -m mfa_hf.benchmark --suite full --output report.html

Three sections, each row tagged with `section`:
- scaling: forward time and peak memory vs sequence length, SDPA and every backend that serves the
  shape (quick suite's worker, one subprocess per row);
- decode: one new token over a KV cache per format (decode suite's worker); `gb_per_s` is the cache
  bytes read per second;
- generate: `mfa-hf generate` on the embedded SmolLM2-135M (sdpa, mps_flash, and mps_flash with int8
  and nf4 MFAQuantizedCache), tokens/s; skipped
  with a `error` row when transformers or the model package is missing.
"""

from __future__ import annotations

import json
import sys
from typing import Callable

import torch

from .measure import ratio
from .runner import measure_in_subprocess
from .suite_quick import available_backends

SCALING = {  # device kind -> (batch, heads, head_dim, causal, seqlens quick, seqlens full)
    "cpu": (1, 8, 64, True, (256, 512, 1024, 2048), (256, 512, 1024, 2048, 4096)),
    "gpu": (2, 16, 128, True, (1024, 2048, 4096, 8192), (1024, 2048, 4096, 8192, 16384, 32768)),
}
DECODE_LENGTHS = {"cpu": ((2048, 8192), (2048, 8192, 32768)), "gpu": ((4096, 16384, 65536), (4096, 16384, 65536))}
DECODE_IMPLS = (("sdpa", "bf16", "bfloat16"), ("mfa", "bf16", "bfloat16"), ("mfa", "fp8_e4m3", "bfloat16"),
                ("mfa", "int8", "bfloat16"), ("mfa", "nf4", "bfloat16"))
GENERATE = (("sdpa", "none"), ("mps_flash", "none"), ("mps_flash", "int8"), ("mps_flash", "nf4"))


def _kind(device: str) -> str:
    return "cpu" if device.startswith("cpu") else "gpu"


def plan(device: str, quick: bool) -> list[tuple[str, dict, str | None]]:
    """Every job as (section, spec, forced backend), so the progress bar knows the total first."""
    return _scaling_jobs(device, quick) + _decode_jobs(device, quick) + _generate_jobs(device, quick)


def _scaling_jobs(device, quick):
    batch, heads, dim, causal, short, long = SCALING[_kind(device)]
    dtype = torch.float32 if _kind(device) == "cpu" else torch.float16
    jobs = []
    for seqlen in short if quick else long:
        spec = dict(impl="sdpa", batch=batch, heads=heads, seqlen=seqlen, head_dim=dim, causal=causal,
                    dtype=str(dtype).replace("torch.", ""), device=device, repeats=3, **{"pass": "fwd"})
        jobs.append(("scaling", spec, None))
        for name in available_backends(device, dtype, (batch, heads, seqlen, dim, causal)):
            jobs.append(("scaling", {**spec, "impl": "mfa"}, name))
    return jobs


def _decode_jobs(device, quick):
    lengths = DECODE_LENGTHS[_kind(device)][0 if quick else 1]
    return [("decode", dict(impl=impl, format=fmt, dtype=dtype, kv_len=length, batch=1, device=device, repeats=3),
             None) for length in lengths for impl, fmt, dtype in DECODE_IMPLS]


def _generate_jobs(device, quick):
    new_tokens = 16 if quick else 64
    return [("generate", dict(attn=attn, kv_cache=kv, new_tokens=new_tokens, device=device), None)
            for attn, kv in GENERATE]


WORKERS = {"scaling": "mfa_hf.benchmark.worker", "decode": "mfa_hf.benchmark.suite_decode",
           "generate": "mfa_hf.benchmark.suite_full"}


def run(device: str, quick: bool, progress: Callable[[str], None]) -> list[dict]:
    jobs = plan(device, quick)
    rows = []
    for i, (section, spec, backend) in enumerate(jobs, 1):
        progress(f"{progress_bar(i - 1, len(jobs))} {section}: {_label(spec, backend)}")
        try:
            row = measure_in_subprocess(WORKERS[section], spec, backend)
        except RuntimeError as error:  # one failed row must not lose the others: it is reported
            row = {**spec, "error": str(error).strip().splitlines()[-1][:200]}
        row["section"] = section
        if section == "scaling":
            row["impl"] = "sdpa" if backend is None else f"mfa[{backend}]"
        rows.append(row)
    progress(f"{progress_bar(len(jobs), len(jobs))} done")
    return _derive(rows)


def progress_bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def _label(spec: dict, backend: str | None) -> str:
    keys = ("impl", "format", "attn", "kv_cache", "seqlen", "kv_len")
    return " ".join(f"{k}={spec[k]}" for k in keys if k in spec) + (f" backend={backend}" if backend else "")


def _derive(rows: list[dict]) -> list[dict]:
    """Speedup over SDPA for scaling rows; cache bytes read per second for decode rows."""
    sdpa = {(r["seqlen"]): r["median_ms"] for r in rows if r["section"] == "scaling" and r["impl"] == "sdpa"
            and "median_ms" in r}
    for row in rows:
        if "median_ms" not in row:
            continue
        if row["section"] == "scaling" and row["seqlen"] in sdpa:
            row["x_sdpa"] = ratio(sdpa[row["seqlen"]], row["median_ms"])
        if row["section"] == "decode":
            row["gb_per_s"] = ratio(row["cache_mb"] * 2**20, row["median_ms"] / 1e3 * 1e9)
    return rows


def measure_generate(spec: dict) -> dict:
    """Worker for a generate row: the embedded SmolLM2 with one attention and KV cache."""
    from mfa_hf.integrations.transformers import generate as gen

    dtype = torch.float32 if spec["device"] == "cpu" else torch.float16
    tokenizer, lm = gen.load(None, None, spec["attn"], dtype, spec["device"])
    prompt = "Explain in a few sentences why attention kernels that stream keys use little memory."
    result = gen.generate(tokenizer, lm, prompt, spec["new_tokens"], kv_cache=spec["kv_cache"], progress=False)
    return {**spec, "prompt_tokens": result.prompt_tokens, "new_tokens": result.new_tokens,
            "prefill_tok_s": round(result.prefill_tok_s, 1), "decode_tok_s": round(result.decode_tok_s, 2),
            "peak_mem_mb": round(result.peak_memory_mb, 1)}


if __name__ == "__main__":
    print(json.dumps(measure_generate(json.loads(sys.argv[1]))))
