"""python -m mfa_hf.benchmark --suite quick [--device cpu|cuda|mps] [--full-size] [--output report.html] [--json rows.json]

Prints a table per suite; progress goes to stderr while it runs. --output writes a self-contained
HTML report with plots (made for --suite full); --json writes the rows as JSON (any suite).
--suite standard is mps-flash-attn's run_suite grid (suite_standard.py); --seq-lengths, --dtypes and
--backward set that grid, as in mps-flash-attn (the other suites have fixed shapes and refuse them).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys

import torch

from ..cli_checks import UsageError, check_device, positive_int, writable_path

from .table import format_table

SUITES = {  # name -> (module, columns shown)
    "quick": ("mfa_hf.benchmark.suite_quick",
              ["impl", "pass", "batch", "heads", "seqlen", "head_dim", "causal", "dtype", "median_ms",
               "x_sdpa", "peak_mem_mb", "served_by"]),
    "decode": ("mfa_hf.benchmark.suite_decode",
               ["impl", "format", "kv_len", "batch", "cache_mb", "bytes_per_token", "median_ms", "x_sdpa_bf16",
                "peak_mem_mb", "served_by"]),
    "generate": ("mfa_hf.benchmark.suite_generate",
                 ["attn", "kv_cache", "context", "new_tokens", "prefill_s", "decode_tok_s", "peak_mem_mb", "cache_mb",
                  "served_by", "error"]),
    "cuda": ("mfa_hf.benchmark.suite_cuda",
             ["impl", "pass_", "dtype", "head_dim", "seqlen", "batch", "heads", "causal", "median_ms", "tflops",
              "error"]),
    "diffusers": ("mfa_hf.benchmark.suite_diffusers",
                  ["model", "processor", "tokens", "device", "dtype", "median_ms", "median_ms_runs", "ratio_vs_default",
                   "interleaved_ratio", "interleaved_ratio_runs", "peak_mem_mb", "forward_peak_growth_mb",
                   "kernel_calls", "max_abs_diff_vs_default"]),
    "standard": ("mfa_hf.benchmark.suite_standard", ["batch", "heads", "seqlen", "head_dim", "dtype", "causal", "window",
                                                     "pass", "sdpa_ms", "mfa_ms", "speedup", "max_diff", "served_by"]),
    "full": ("mfa_hf.benchmark.suite_full",
             ["section", "impl", "format", "attn", "kv_cache", "seqlen", "kv_len", "median_ms", "x_sdpa", "gb_per_s",
              "decode_tok_s", "peak_mem_mb", "served_by", "error"]),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mfa_hf.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--device", default=None, help="default: cuda, else mps, else cpu")
    parser.add_argument("--full-size", action="store_true", help="the suite's larger shapes")
    parser.add_argument("--output", type=writable_path, default=None,
                        help="write an HTML report with plots to this path")
    parser.add_argument("--json", type=writable_path, default=None, help="write the rows as JSON to this path")
    parser.add_argument("--seq-lengths", type=positive_int, nargs="+", default=None,
                        help="--suite standard: sequence lengths")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=("float16", "bfloat16", "float32"),
                        help="--suite standard: float16, bfloat16, float32")
    parser.add_argument("--backward", action="store_true", help="--suite standard: forward+backward rows too")
    parser.add_argument("--rounds", type=int, default=None,
                        help="suites that alternate rounds (diffusers): how many (default: the suite's)")
    args = parser.parse_args(argv)
    grid = {"seq_lengths": args.seq_lengths, "dtypes": args.dtypes, "backward": args.backward}
    given = [f"--{name.replace('_', '-')}" for name, value in grid.items() if value]
    if given and args.suite != "standard":
        parser.error(f"{', '.join(given)}: set the grid of --suite standard (mps-flash-attn's run_suite grid); "
                     f"--suite {args.suite} runs fixed shapes")
    from .suite_quick import default_device

    try:
        device = check_device(args.device) if args.device else default_device()
    except UsageError as error:
        parser.error(str(error))
    module_name, columns = SUITES[args.suite]
    module = importlib.import_module(module_name)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    extra = {name: value for name, value in grid.items() if value} if args.suite == "standard" else {}
    if args.rounds is not None:
        if "rounds" not in inspect.signature(module.run).parameters:
            parser.error(f"--rounds: --suite {args.suite} runs no alternating rounds")
        if args.rounds < 1:
            parser.error(f"--rounds: expected a positive count, got {args.rounds}")
        extra["rounds"] = args.rounds
    try:
        rows = module.run(device, not args.full_size, log, **extra)
    except UsageError as error:  # a suite's own argument check: one line and exit 2, as argparse's
        parser.error(str(error))
    print(f"# suite {args.suite} on {device}; torch {torch.__version__}")
    print(format_table(rows, [c for c in columns if any(c in row for row in rows)]))
    if args.output:
        from .report import write_report

        print(f"# report written to {write_report(rows, device, args.output)}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2, default=str)
        print(f"# JSON rows written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
