"""A self-contained HTML benchmark report: inline SVG plots drawn here (no plotting dependency),
the rows as tables, and the device, versions and date the numbers belong to."""

from __future__ import annotations

import datetime
import html
import math
import platform
from pathlib import Path

import torch

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT, MARGIN = 520, 300, (48, 16, 20, 62)  # margins: top, right, bottom extra, left


def environment(device: str) -> dict[str, str]:
    """What the numbers depend on: device, library versions, date."""
    info = {"device": _device_name(device), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__}
    for name in ("mfa_hf", "transformers", "diffusers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = "not installed"
    return info


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name()})"
    if device.startswith("cpu"):
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return device


def _ticks(low: float, high: float, log: bool) -> list[float]:
    if log:
        return [10.0**e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)]
    step = 10 ** math.floor(math.log10(max(high - low, 1e-12)))
    step *= 5 if (high - low) / step > 5 else 1
    return [low + i * step for i in range(int((high - low) / step) + 2)]


def _scale(value: float, low: float, high: float, log: bool) -> float:
    if log:
        value, low, high = math.log10(value), math.log10(low), math.log10(high)
    return (value - low) / (high - low) if high > low else 0.5


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str,
               log_x: bool = True, log_y: bool = False) -> str:
    """An SVG line chart; each series is [(x, y), ...] and gets a colour and a legend entry."""
    points = [(x, y) for values in series.values() for x, y in values if y is not None and (y > 0 or not log_y)]
    if not points:
        return f'<p class="empty">{html.escape(title)}: no data</p>'
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = (min(ys), max(ys)) if log_y else (0.0, max(ys) * 1.1 or 1.0)
    left, top, plot_w, plot_h = MARGIN[3], MARGIN[0], WIDTH - MARGIN[3] - MARGIN[1], HEIGHT - MARGIN[0] - 50

    def at(x, y):
        return (left + plot_w * _scale(x, x_lo, x_hi, log_x), top + plot_h * (1 - _scale(y, y_lo, y_hi, log_y)))

    parts = [_frame(title, x_label, y_label, left, top, plot_w, plot_h)]
    parts += _x_ticks(sorted(set(xs)), at, y_lo, top + plot_h)
    parts += _y_ticks([t for t in _ticks(y_lo, y_hi, log_y) if y_lo <= t <= y_hi], at, x_lo, left)
    for n, (name, values) in enumerate(series.items()):
        color = COLORS[n % len(COLORS)]
        coords = [at(x, y) for x, y in sorted(values) if y is not None and (y > 0 or not log_y)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in coords]
        parts.append(_legend(n, name, color, left + plot_w))
    return _svg(parts)


def bar_chart(title: str, bars: list[tuple[str, float]], y_label: str) -> str:
    """An SVG bar chart of labelled values."""
    bars = [(label, value) for label, value in bars if value is not None]
    if not bars:
        return f'<p class="empty">{html.escape(title)}: no data</p>'
    left, top, plot_w, plot_h = MARGIN[3], MARGIN[0], WIDTH - MARGIN[3] - MARGIN[1], HEIGHT - MARGIN[0] - 50
    high = max(value for _, value in bars) * 1.15 or 1.0
    parts = [_frame(title, "", y_label, left, top, plot_w, plot_h)]
    slot = plot_w / len(bars)
    for n, (label, value) in enumerate(bars):
        h = plot_h * value / high
        x = left + n * slot + slot * 0.15
        parts.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" '
                     f'fill="{COLORS[n % len(COLORS)]}"/>')
        parts.append(f'<text x="{x + slot * 0.35:.1f}" y="{top + plot_h - h - 4:.1f}" text-anchor="middle" '
                     f'font-size="11">{value:.3g}</text>')
        parts.append(f'<text x="{x + slot * 0.35:.1f}" y="{top + plot_h + 16:.1f}" text-anchor="middle" '
                     f'font-size="11">{html.escape(label)}</text>')
    return _svg(parts)


def _svg(parts: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">' + "".join(parts) + "</svg>")


def _frame(title, x_label, y_label, left, top, plot_w, plot_h) -> str:
    return (f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">'
            f'{html.escape(title)}</text>'
            f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>'
            f'<text x="{left + plot_w / 2}" y="{HEIGHT - 8}" text-anchor="middle" font-size="12">'
            f'{html.escape(x_label)}</text>'
            f'<text transform="translate(14,{top + plot_h / 2}) rotate(-90)" text-anchor="middle" font-size="12">'
            f'{html.escape(y_label)}</text>')


def _x_ticks(xs, at, y_low, bottom) -> list[str]:
    return [f'<text x="{at(x, y_low)[0]:.1f}" y="{bottom + 16}" text-anchor="middle" font-size="11">'
            f'{_short(x)}</text>' for x in xs]


def _y_ticks(ticks, at, x_low, left) -> list[str]:
    out = []
    for t in ticks:
        y = at(x_low, t)[1]
        out.append(f'<line x1="{left}" x2="{WIDTH - MARGIN[1]}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_short(t)}</text>')
    return out


def _legend(n: int, name: str, color: str, right: float) -> str:
    y = MARGIN[0] + 14 + 16 * n
    return (f'<rect x="{right - 150}" y="{y - 9}" width="10" height="10" fill="{color}"/>'
            f'<text x="{right - 136}" y="{y}" font-size="11">{html.escape(name)}</text>')


def _short(value: float) -> str:
    if value >= 1024 and value % 1024 == 0:
        return f"{int(value) // 1024}k"
    return f"{value:.3g}"


def _series(rows, key_name, x, y) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list] = {}
    for row in rows:
        if y in row and x in row:
            series.setdefault(str(key_name(row)), []).append((row[x], row[y]))
    return series


def figures(rows: list[dict]) -> list[tuple[str, str]]:
    """(section heading, SVG or note) for every plot the full suite feeds."""
    scaling = [r for r in rows if r.get("section") == "scaling"]
    decode = [r for r in rows if r.get("section") == "decode"]
    generate = [r for r in rows if r.get("section") == "generate"]
    impl = lambda r: r["impl"]  # noqa: E731
    decode_name = lambda r: f"{r['impl']} {r['format']}"  # noqa: E731
    return [
        ("Time vs sequence length", line_chart("Forward time per backend", _series(scaling, impl, "seqlen",
                                               "median_ms"), "sequence length", "median ms", log_y=True)),
        ("Peak memory vs sequence length", line_chart("Forward peak memory per backend", _series(
            scaling, impl, "seqlen", "peak_mem_mb"), "sequence length", "peak MB")),
        ("Speedup over SDPA", line_chart("SDPA time / backend time (above 1: faster)", _series(
            [r for r in scaling if r["impl"] != "sdpa"], impl, "seqlen", "x_sdpa"), "sequence length", "x SDPA")),
        ("Decode bandwidth per KV format", line_chart("KV cache bytes read per second", _series(
            decode, decode_name, "kv_len", "gb_per_s"), "KV length (tokens)", "GB/s")),
        ("Generation tokens/s", bar_chart("SmolLM2-135M decode tokens/s", [
            (f"{r['attn']} kv={r['kv_cache']}", r.get("decode_tok_s")) for r in generate], "tokens/s")),
    ]


def table(rows: list[dict], skip=("section", "device", "repeats")) -> str:
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in skip]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


STYLE = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1150px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}.figs{display:flex;flex-wrap:wrap;gap:16px}
.fig{border:1px solid #ddd;padding:6px}table{border-collapse:collapse;font-size:12px;margin:8px 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;font-size:13px}dt{font-weight:bold}
.empty{color:#999}.note{font-size:13px;color:#555}"""


def render(rows: list[dict], device: str, info: dict[str, str] | None = None) -> str:
    info = info or environment(device)
    meta = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in info.items())
    figs = "".join(f'<div class="fig"><h2>{html.escape(h)}</h2>{svg}</div>' for h, svg in figures(rows))
    sections = "".join(f"<h2>Rows: {s}</h2>" + table([r for r in rows if r.get("section") == s])
                       for s in dict.fromkeys(r.get("section", "rows") for r in rows))
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>mfa-hf benchmark report"
            f"</title><style>{STYLE}</style></head><body><h1>mfa-hf benchmark report</h1><dl>{meta}</dl>"
            f"<p class=\"note\">Medians of repeated calls, each row in its own process. Numbers hold for this "
            f"device and these versions only.</p><div class=\"figs\">{figs}</div>{sections}</body></html>")


def write_report(rows: list[dict], device: str, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(render(rows, device), encoding="utf-8")
    return path
