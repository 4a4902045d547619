"""generate_report(results, output_path, title): mps-flash-attn's HTML report of run_suite's results.

results: run_suite's rows (a list of dicts or a pandas DataFrame). The page has the summary mps-flash-attn
printed (average / max / min speedup over SDPA), the device and versions (report.environment) and the rows
(report.table). The CLI's `--suite full --output report.html` report (with plots) is report.write_report.
"""

from __future__ import annotations

import html
from pathlib import Path

from .report import STYLE, environment, table
from .suite_quick import default_device


def generate_report(results, output_path, title: str = "MPS Flash Attention Benchmark Report",
                    device: str | None = None) -> Path:
    rows = results.to_dict("records") if hasattr(results, "to_dict") else list(results)
    if not all(isinstance(row, dict) for row in rows):
        raise TypeError("results: expected run_suite's rows (dicts or a DataFrame), got "
                        f"{sorted({type(r).__name__ for r in rows if not isinstance(r, dict)})}")
    info = environment(device or default_device())
    meta = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in info.items())
    speedups = [row["speedup"] for row in rows if isinstance(row.get("speedup"), (int, float))]
    summary = (f"<p>Average speedup: <strong>{sum(speedups) / len(speedups):.2f}x</strong>; max {max(speedups):.2f}x; "
               f"min {min(speedups):.2f}x (SDPA time / mfa time)</p>" if speedups else "<p>No SDPA comparison.</p>")
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><dl>{meta}</dl>"
            f"<p>Total benchmarks: {len(rows)}</p>{summary}{table(rows) if rows else ''}</body></html>")
    path = Path(output_path)
    path.write_text(page, encoding="utf-8")
    print(f"Report written to {path}")
    return path
