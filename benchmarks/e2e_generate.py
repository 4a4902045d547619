"""End to end, one run: prefill and greedy-decode tokens/s of a model built from its config, per path.

    python benchmarks/e2e_generate.py --device cuda --shape llama-1b --dtype bfloat16 --context 8192 --new 128
    python benchmarks/e2e_generate.py --device cpu --shape smollm-135m --dtype float32 --context 1024 --new 32

The weights are random (no hub here); attention cost does not depend on their values, and every row uses
the same seed. Rows (each in its own subprocess, so peak memory is the row's own): sdpa, mps_flash (our
attention function with transformers' default cache), mps_flash + MFAQuantizedCache (fp8_e4m3, int8, nf4),
sdpa + transformers' QuantizedCache (quanto int4, hqq int8) when those packages are installed. Ratios are
against sdpa measured in the same run. --contexts lists extra contexts (e.g. 8192 32768), each run for sdpa and
the caches of --context-caches (default int8; e.g. int8 nf4 hf_hqq hf_quanto), with --context-repeats runs a row
(default --repeats). A second table sets each of our quantized caches beside transformers' own at the same bits and
context (int8 against hqq 8-bit, nf4 against quanto 4-bit).

--repeats N (default 3 on cpu, 1 elsewhere) runs every row N times, round-robin (row 1, row 2, ..., row 1, ...),
so a slow spell of a noisy host lands on every row rather than on one. Each row reports its median tok/s (the
ratios are medians over medians) and the spread (min-max) of its runs. Prints a markdown table and one JSON line
per row (prefill_tok_s/decode_tok_s are the medians; *_runs hold every run; peak_mem_mb is the largest run's).
The decode is timed untraced (a traced call records its route and skips the decode plan's replay); "served by"
counts the prefill's calls and those of one traced decode step after the timing, at the final length.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256),
    "smollm-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                        intermediate_size=1536, vocab_size=49152),
}
ROWS = (("sdpa", "none"), ("mps_flash", "none"), ("mps_flash", "fp8_e4m3"), ("mps_flash", "int8"),
        ("mps_flash", "nf4"), ("sdpa", "hf_quanto"), ("sdpa", "hf_hqq"))
HF_CACHES = {"hf_quanto": ("quanto", 4, "optimum.quanto"), "hf_hqq": ("hqq", 8, "hqq")}


def make_cache(kind: str, config):
    """A fresh KV cache of one row's kind: "none" (transformers' DynamicCache), one of HF_CACHES (transformers'
    QuantizedCache), else an MFAQuantizedCache format."""
    from transformers import DynamicCache

    from mfa_hf.integrations.transformers.quantized_cache import MFAQuantizedCache

    if kind == "none":
        return DynamicCache(config=config)
    if kind in HF_CACHES:
        from transformers import QuantizedCache

        backend, bits, _ = HF_CACHES[kind]
        return QuantizedCache(backend=backend, config=config, nbits=bits)
    return MFAQuantizedCache(format=kind, config=config)


def measure(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import mfa_hf.integrations.transformers  # noqa: F401  registers "mps_flash"
    from mfa_hf import trace
    from mfa_hf.benchmark.measure import PrefillTraced
    from mfa_hf.integrations.transformers import cache_kwargs
    from mfa_hf.integrations.transformers.generate import peak_memory_mb

    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[spec["shape"]], max_position_embeddings=max(131072, spec["context"] * 2),
                         rope_theta=500000.0, tie_word_embeddings=True)
    with torch.device(device):  # initialised where it runs (a 1B model's CPU init would dominate the row)
        lm = AutoModelForCausalLM.from_config(config, attn_implementation=spec["attn"], dtype=dtype).eval()
    ids = torch.randint(0, config.vocab_size, (1, spec["context"]), device=device)
    kind = spec["kv_cache"]

    def new_cache():
        return make_cache(kind, lm.config)

    # Warm-up: library init, kernel compilation and autotuning stay out of the timing. On a GPU it runs the whole
    # prompt: kernels are built per shape class there (our Triton block tables switch past 1k tokens, and cuDNN
    # builds an execution plan per shape), which a 256-token warm-up left inside the timed prefill (session 18, H100:
    # three rows whose prefill all ran torch's own SDPA kernels timed 0.86x, 1.00x and 1.03x in one run).
    warm = ids if device.startswith("cuda") else ids[:, :256]
    with torch.inference_mode():
        lm.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, do_sample=False,
                    pad_token_id=0, **cache_kwargs(new_cache()))
    cache = new_cache()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    stamps = []

    class Stamps:
        def put(self, value):
            sync()
            stamps.append(time.perf_counter())

        def end(self):
            pass

    streamer = PrefillTraced(Stamps())  # the prefill traced (it names the kernels), the timed decode steps not
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=spec["new"],
                          min_new_tokens=spec["new"], do_sample=False, streamer=streamer, pad_token_id=0,
                          **cache_kwargs(cache))
        sync()
        end = time.perf_counter()
    streamer.named_step(lm, out, cache_kwargs(cache))
    calls = streamer.calls
    first = stamps[1]  # stamps[0]: the prompt handed to the streamer; stamps[1]: the first new token
    served = trace.served_by(calls)
    peak = peak_memory_mb(device)  # cuda: max allocated; cpu: the row process's peak RSS (model included)
    return dict(attn=spec["attn"], kv_cache=kind, context=spec["context"], new=spec["new"],
                prefill_tok_s=round(spec["context"] / (first - start), 1),
                decode_tok_s=round((len(stamps) - 2) / (end - first), 2),
                peak_mem_mb=None if peak is None else round(peak), served_by=" ".join(
                    f"{b}:{op}={n}" for (b, op), n in sorted(served.items())) or "-")


def missing_package(kind: str) -> str | None:
    """The package a row's kv cache needs (transformers' quantized caches) when it is not installed, else None."""
    import importlib.util

    package = HF_CACHES.get(kind, (None, None, None))[2]
    if package is not None and importlib.util.find_spec(package.split(".")[0]) is None:
        return package
    return None


def _row(spec: dict) -> dict:
    missing = missing_package(spec["kv_cache"])
    if missing:
        return dict(spec, error=f"{missing} not installed")
    done = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                          timeout=spec.get("timeout", 900 + spec["context"] // 16), env=os.environ)
    if done.returncode:
        return dict(spec, error=(done.stderr.strip().splitlines() or ["?"])[-1][:400])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _combined(runs: list[dict]) -> dict:
    """One row from its repeated runs: medians, every run's figures, and the first error if any run failed."""
    failed = next((run for run in runs if "error" in run), None)
    if failed is not None:
        return failed
    row = dict(runs[0], repeats=len(runs))
    for key in ("prefill_tok_s", "decode_tok_s"):
        values = [run[key] for run in runs]
        row[key] = round(statistics.median(values), 2)
        row[key + "_runs"] = values
    peaks = [run["peak_mem_mb"] for run in runs if run["peak_mem_mb"] is not None]
    row["peak_mem_mb"] = max(peaks) if peaks else None
    return row


def _spread(row: dict, key: str) -> str:
    runs = row.get(key + "_runs", [row[key]])
    return f"{min(runs)}-{max(runs)}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="smollm-135m", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--contexts", type=int, nargs="*", default=(), help="extra contexts, for sdpa and the caches "
                        "of --context-caches")
    parser.add_argument("--context-caches", nargs="*", default=("int8",), help="kv caches run at the extra contexts")
    parser.add_argument("--context-repeats", type=int, default=None, help="runs a row at the extra contexts "
                        "(default: --repeats)")
    parser.add_argument("--skip", nargs="*", default=(), help="kv caches to leave out, e.g. hf_quanto hf_hqq")
    parser.add_argument("--main-rows", action=argparse.BooleanOptionalAction, default=True,
                        help="run every row at --context (--no-main-rows: only the --contexts rows)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per row, round-robin (default: 3 on cpu, 1 "
                        "elsewhere); medians are reported")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    repeats = args.repeats or (3 if args.device == "cpu" else 1)
    base = dict(device=args.device, shape=args.shape, dtype=args.dtype, new=args.new)
    main_rows = [dict(base, attn=a, kv_cache=c, context=args.context) for a, c in ROWS
                 if c not in args.skip and args.main_rows]
    extra = [(a, c) for a, c in ROWS if (a, c) == ("sdpa", "none") or c in args.context_caches]
    extra_rows = [dict(base, attn=a, kv_cache=c, context=context) for context in args.contexts for a, c in extra]
    rows = _measured(main_rows, repeats) + _measured(extra_rows, args.context_repeats or repeats)
    import torch
    import transformers

    print(f"# e2e {args.shape} {args.dtype} on {args.device}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {time.strftime('%Y-%m-%d')}, {repeats} run(s) per row round-robin: "
          f"medians, ratios of medians")
    print("| attn | kv cache | context | prefill tok/s | min-max | x sdpa | decode tok/s | min-max | x sdpa | peak MB "
          "| served by |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['attn']} | {row['kv_cache']} | {row['context']} | - | - | - | - | - | - | - | "
                  f"{row['error']} |")
            continue
        sdpa = next((r for r in rows if r["attn"] == "sdpa" and r["kv_cache"] == "none"
                     and r["context"] == row["context"] and "error" not in r), None)
        ratio = (lambda key: f"{row[key] / sdpa[key]:.2f}") if sdpa else (lambda key: "-")
        peak = row["peak_mem_mb"]
        print(f"| {row['attn']} | {row['kv_cache']} | {row['context']} | {row['prefill_tok_s']} | "
              f"{_spread(row, 'prefill_tok_s')} | {ratio('prefill_tok_s')} | {row['decode_tok_s']} | "
              f"{_spread(row, 'decode_tok_s')} | {ratio('decode_tok_s')} | {peak} | {row['served_by']} |")
    _print_same_bits(rows)
    for row in rows:
        print(json.dumps(row))


def _measured(specs: list[dict], repeats: int) -> list[dict]:
    """Each spec's row from `repeats` runs, round-robin: every row's n-th run before any row's (n+1)-th."""
    runs = [[] for _ in specs]
    for _ in range(repeats):
        for spec, row_runs in zip(specs, runs):
            row_runs.append(_row(spec))
            # at once, one line a run: a run cut by a time limit (a lent GPU's call) keeps the rows it measured
            print("# run", json.dumps(row_runs[-1]), flush=True)
    return [_combined(row_runs) for row_runs in runs]


SAME_BITS = (("int8", "hf_hqq"), ("nf4", "hf_quanto"))  # ours, transformers' cache at the same bits


def _print_same_bits(rows: list[dict]) -> None:
    """Our quantized caches against transformers' at the same bits and context, where both rows ran."""
    found = {(r["kv_cache"], r["context"]): r for r in rows if "error" not in r}
    pairs = [(ours, theirs, context) for ours, theirs in SAME_BITS for (kind, context) in found
             if kind == ours and (theirs, context) in found]
    if not pairs:
        return
    print()
    print("| ours | transformers' | context | prefill x theirs | decode x theirs |")
    print("|---|---|---|---|---|")
    for ours, theirs, context in pairs:
        a, b = found[(ours, context)], found[(theirs, context)]
        print(f"| {ours} | {theirs} ({HF_CACHES[theirs][0]} {HF_CACHES[theirs][1]}-bit) | {context} | "
              f"{a['prefill_tok_s'] / b['prefill_tok_s']:.2f} | {a['decode_tok_s'] / b['decode_tok_s']:.2f} |")


if __name__ == "__main__":
    main()
