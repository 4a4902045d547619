"""The report: one JSON file (for tools) and one markdown file (to attach to a bug report), with the
summary and the one-line verdict the command prints."""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA = "mfa-hf-doctor/1"
JSON_NAME, MARKDOWN_NAME = "report.json", "report.md"


def summarize(compile_rows: list[dict], correctness_rows: list[dict], timing_rows: list[dict],
              fatal: str | None = None) -> dict:
    def count(rows):
        failed = sum(r["status"] == "failed" for r in rows)
        return {"total": len(rows), "passed": sum(r["status"] == "passed" for r in rows), "failed": failed}

    timing_failed = sum(r["status"] == "failed" for r in timing_rows)
    summary = {
        "compile": count(compile_rows),
        "correctness": count(correctness_rows),
        "timing": {"total": len(timing_rows), "measured": sum(r["status"] == "measured" for r in timing_rows),
                   "failed": timing_failed},
        "fatal": fatal,
    }
    summary["passed"] = (fatal is None and summary["compile"]["failed"] == 0 and summary["correctness"]["failed"] == 0
                         and timing_failed == 0)
    summary["verdict"] = verdict(summary, timing_rows)
    return summary


def verdict(summary: dict, timing_rows: list[dict]) -> str:
    if summary["fatal"]:
        return f"FAIL: {summary['fatal'].splitlines()[0]}"
    c, k, t = summary["compile"], summary["correctness"], summary["timing"]
    parts = [f"{c['passed']}/{c['total']} kernel variants compiled",
             f"{k['passed']}/{k['total']} correctness checks passed"]
    if t["failed"]:
        parts.append(f"{t['failed']} timing runs failed")
    elif t["measured"]:
        parts.append(f"{t['measured']} timings measured")
    elif timing_rows:
        parts.append(f"timing {timing_rows[0]['status']}")
    else:
        parts.append("timing skipped")
    return ("PASS: " if summary["passed"] else "FAIL: ") + ", ".join(parts)


def write(report: dict, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = folder / JSON_NAME, folder / MARKDOWN_NAME
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    markdown_path.write_text(markdown(report))
    return json_path, markdown_path


def markdown(report: dict) -> str:
    env, summary = report["environment"], report["summary"]
    lines = ["# mfa-hf doctor report", "", f"**{summary['verdict']}**", "",
             "Attach this file (and report.json beside it) to your bug report.", ""]
    lines += _environment(report, env)
    if summary["fatal"]:
        lines += ["## Could not run", "", "```text", summary["fatal"], "```", ""]
    lines += _compile(report)
    lines += _correctness(report)
    lines += _timing(report)
    lines += ["## Summary", "", summary["verdict"], ""]
    return "\n".join(lines)


def _environment(report: dict, env: dict) -> list[str]:
    versions = env.get("versions", {})
    rows = [("command", f"`{report['command']}`"), ("created", report["created"]), ("chip", env.get("chip")),
            ("macOS", env.get("macos")), ("platform", env.get("platform")), ("Python", env.get("python")),
            *((name, version) for name, version in versions.items()),
            ("MSL version torch compiles with", env.get("msl_version")),
            ("fast math (PYTORCH_MPS_FAST_MATH)", "on" if env.get("fast_math") else "off"),
            ("math modes checked", ", ".join(report.get("modes", [])) or "none"),
            ("emulated", ("yes: " if env.get("emulated") else "no: ") + str(env.get("runtime", ""))),
            ("compiler", env.get("compiler")), ("variant selection", report.get("selection", ""))]
    lines = ["## Environment", "", "| item | value |", "|---|---|"]
    lines += [f"| {_cell(name)} | {_cell(value)} |" for name, value in rows]
    notes = report.get("notes", [])
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return lines + [""]


def _compile(report: dict) -> list[str]:
    rows = report["compile"]
    s = report["summary"]["compile"]
    lines = [f"## Compile: {s['total']} variants, {s['passed']} compiled OK, {s['failed']} failed", ""]
    if not rows:
        return lines + ["Not run.", ""]
    lines += ["| mode | result | variant | kernels: max threads per threadgroup (launched) | s |", "|---|---|---|---|---|"]
    for row in rows:
        result = "compiled OK" if row["status"] == "passed" else f"**FAILED**: {_first_line(row['error'])}"
        kernels = ", ".join(f"{k['name']} {k['max_threads_per_threadgroup']} ({k['threads_launched']})"
                            for k in row["kernels"])
        lines.append(f"| {row['mode']} | {_cell(result)} | {_cell(row['id'])} | {_cell(kernels)} | {row['seconds']} |")
    failures = [row for row in rows if row["status"] != "passed"]
    if failures:
        lines += ["", "### Compile failures (full messages)", ""]
        for row in failures:
            lines += [f"#### {row['id']} ({row['mode']})", "", "```text", str(row["error"]), "```", ""]
    skipped = report.get("skipped", [])
    if skipped:
        lines += ["", f"{len(skipped)} variants not compiled because the backend does not serve them here:", ""]
        lines += [f"- {name}: {reason}" for name, reason in skipped[:50]]
    return lines + [""]


def _correctness(report: dict) -> list[str]:
    rows = report["correctness"]
    s = report["summary"]["correctness"]
    lines = [f"## Correctness: {s['total']} checks, {s['passed']} passed, {s['failed']} failed", "",
             "The metal backend against the float64 CPU reference; tolerance: 2 x PyTorch's own error in the dtype "
             "+ a floor (3 x for gradients and softcap).", ""]
    if not rows:
        return lines + ["Not run.", ""]
    lines += ["| mode | result | check | kind | dtype | detail | s |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        result = "passed" if row["status"] == "passed" else "**FAILED**"
        lines.append(f"| {row['mode']} | {result} | {_cell(row['id'])} | {row['kind']} | {row['dtype']} | "
                     f"{_cell(row['detail'])} | {row['seconds']} |")
    return lines + [""]


def _timing(report: dict) -> list[str]:
    rows = report["timing"]
    lines = ["## Timing: ours vs torch's mps SDPA and MLX's fused SDPA (median ms)", ""]
    if not rows:
        return lines + ["Skipped.", ""]
    lines += ["| shape | ours ms | SDPA ms | SDPA / ours | MLX ms | MLX / ours | status |",
              "|---|---|---|---|---|---|---|"]
    for row in rows:
        status = row["status"] + (f": {_first_line(row['detail'])}" if row.get("detail") else "")
        mlx = row.get("mlx_detail", "")
        if mlx and mlx != "measured" and mlx not in _shared_mlx_reason(rows):
            status += f"; {_first_line(mlx)}"
        lines.append(f"| {_cell(row['shape'])} | {_num(row['ours_ms'])} | {_num(row['sdpa_ms'])} | "
                     f"{_num(row['speedup'])} | {_num(row.get('mlx_ms'))} | {_num(row.get('mlx_speedup'))} | "
                     f"{_cell(status)} |")
    lines += ["", "SDPA / ours > 1 and MLX / ours > 1 mean ours is faster."]
    lines += [f"{reason}." for reason in _shared_mlx_reason(rows)]
    return lines + [""]


def _shared_mlx_reason(rows: list[dict]) -> list[str]:
    """The reason MLX was not timed, when every row shares it (said once under the table)."""
    reasons = {row.get("mlx_detail", "") for row in rows}
    if len(reasons) == 1 and (reason := reasons.pop()) and reason != "measured":
        return [reason]
    return []


def _num(value) -> str:
    return "-" if value is None else f"{value:g}"


def _first_line(text) -> str:
    lines = [line for line in str(text or "").splitlines() if line.strip()]
    if not lines:
        return ""
    # The emulator's messages start with a header line; the first diagnostic is more telling.
    first = lines[0]
    if first.rstrip().endswith(":") and len(lines) > 1:
        first = f"{first} {lines[1].strip()}"
    return first if len(first) <= 200 else first[:200] + "..."


def _cell(value) -> str:
    return str(value if value is not None else "").replace("|", "\\|").replace("\n", " ")
