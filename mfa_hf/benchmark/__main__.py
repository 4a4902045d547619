"""python -m mfa_hf.benchmark --suite quick [--device cpu|cuda|mps] [--full-size] [--output report.html]

Prints a table per suite; progress goes to stderr while it runs. --output writes a self-contained
HTML report with plots (made for --suite full).
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

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
                  ["model", "processor", "tokens", "device", "dtype", "median_ms", "ratio_vs_default",
                   "peak_mem_mb", "forward_peak_growth_mb", "kernel_calls", "max_abs_diff_vs_default"]),
    "full": ("mfa_hf.benchmark.suite_full",
             ["section", "impl", "format", "attn", "kv_cache", "seqlen", "kv_len", "median_ms", "x_sdpa", "gb_per_s",
              "decode_tok_s", "peak_mem_mb", "served_by", "error"]),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mfa_hf.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--device", default=None, help="default: cuda, else mps, else cpu")
    parser.add_argument("--full-size", action="store_true", help="the suite's larger shapes")
    parser.add_argument("--output", default=None, help="write an HTML report with plots to this path")
    args = parser.parse_args(argv)
    from .suite_quick import default_device

    device = args.device or default_device()
    module_name, columns = SUITES[args.suite]
    module = importlib.import_module(module_name)
    rows = module.run(device, not args.full_size, lambda message: print(message, file=sys.stderr, flush=True))
    print(f"# suite {args.suite} on {device}; torch {torch.__version__}")
    print(format_table(rows, [c for c in columns if any(c in row for row in rows)]))
    if args.output:
        from .report import write_report

        print(f"# report written to {write_report(rows, device, args.output)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
