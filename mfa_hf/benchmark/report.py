"""A self-contained HTML benchmark report: inline SVG plots drawn here (no plotting dependency),
the rows as tables, and the device, versions and date the numbers belong to.

Every chart's axes carry the quantity and its unit; a log axis says so and has ticks at powers of ten
(with 2x and 5x steps where it spans under three decades). Each implementation has one colour in every
chart of a report (`color_map`). A memory cell that was not measured (missing, or a counter that read 0)
is left empty with the reason beside it, never printed as 0.0.
"""

from __future__ import annotations

import datetime
import html
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

PALETTE = {  # implementation -> colour; fixed, so a name has the same colour in every chart and every run
    "sdpa": "#1f77b4", "mfa": "#d62728", "mfa-torch": "#ff7f0e", "mfa-triton": "#9467bd", "mfa-metal": "#e377c2",
    "sdpa-flash": "#17becf", "cudnn": "#2ca02c", "flex": "#8c564b", "eager": "#7f7f7f", "native": "#bcbd22"}
ALIASES = {"mps-flash": "mfa", "sdpa-cudnn": "cudnn", "flex-attention": "flex"}
EXTRA_COLORS = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#31a354", "#756bb1")
DASHES = {"fp8-e4m3": "7 3", "fp8-e5m2": "7 3 2 3", "int8": "2 3", "nf4": "9 3 2 3 2 3", "int4": "4 4"}
EXTRA_DASHES = ("5 2", "1 2", "10 4", "3 3 1 3")
WIDTH, HEIGHT, MARGIN = 560, 300, (48, 140, 50, 66)  # margins: top, right (legend), bottom, left


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


# ---- colours: one per implementation for the whole report ------------------------------------------

def implementation(name: str) -> str:
    """The colour key of a series name: 'mfa[triton]', 'mfa_triton' -> 'mfa-triton'; 'mps_flash' -> 'mfa'."""
    key = str(name).strip().lower().replace("_", "-").replace("[", "-").replace("]", "")
    return ALIASES.get(key, key)


def color_map(names) -> dict[str, str]:
    """Implementation key -> colour, assigned once per report. Known implementations keep their fixed
    colour; others take the extra colours in sorted order, so the same rows always get the same colours."""
    keys = {implementation(name) for name in names}
    colors = {key: PALETTE[key] for key in keys if key in PALETTE}
    unknown = sorted(keys - colors.keys())
    colors.update({key: EXTRA_COLORS[n % len(EXTRA_COLORS)] for n, key in enumerate(unknown)})
    return colors


def _dash(fmt: str) -> str:
    key = implementation(fmt)
    if key in DASHES or key in ("bf16", "fp16", "fp32", "none", ""):
        return DASHES.get(key, "")
    return EXTRA_DASHES[sum(map(ord, key)) % len(EXTRA_DASHES)]


# ---- axes ------------------------------------------------------------------------------------------

@dataclass
class Axis:
    """A plotted range with labelled ticks (major) and unlabelled ones (minor)."""

    low: float
    high: float
    log: bool
    ticks: list[float]
    minor: list[float]

    def fraction(self, value: float) -> float:
        low, high = (math.log10(self.low), math.log10(self.high)) if self.log else (self.low, self.high)
        value = math.log10(value) if self.log else value
        return (value - low) / (high - low) if high > low else 0.5


def axis(low: float, high: float, log: bool) -> Axis:
    """The range widened to tick values that enclose [low, high], and its ticks."""
    return _log_axis(low, high) if log else _linear_axis(low, high)


def _log_axis(low: float, high: float) -> Axis:
    first, last = math.floor(math.log10(low)) - 1, math.floor(math.log10(high)) + 2
    grid = [(m, e) for e in range(first, last) for m in (1, 2, 5)]
    values = [_clean(m * 10.0**e) for m, e in grid]
    lo = max(i for i, v in enumerate(values) if v <= low * (1 + 1e-9))
    hi = min(i for i, v in enumerate(values) if v >= high * (1 - 1e-9))
    lo, hi = (lo - 1, hi + 1) if lo == hi else (lo, hi)
    decades = [values[i] for i in range(lo, hi + 1) if grid[i][0] == 1]
    if len(decades) >= 3:
        return Axis(values[lo], values[hi], True, decades, [v for v in values[lo:hi + 1] if v not in decades])
    return Axis(values[lo], values[hi], True, values[lo:hi + 1], [])


def _linear_axis(low: float, high: float) -> Axis:
    span = high - low if high > low else abs(high) or 1.0
    magnitude = 10.0 ** math.floor(math.log10(span / 5))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= span / 5)
    lo, hi = math.floor(low / step + 1e-9) * step, math.ceil(high / step - 1e-9) * step
    hi = hi if hi > lo else lo + step
    ticks = [_clean(lo + i * step) for i in range(round((hi - lo) / step) + 1)]
    return Axis(ticks[0], ticks[-1], False, ticks, [])


def _clean(value: float) -> float:
    return float(f"{value:.12g}")


def tick_label(value: float) -> str:
    """1000 -> '1k', 2e6 -> '2M', 0.05 -> '0.05'."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def _axis_label(label: str, log: bool) -> str:
    if not log:
        return label
    return f"{label[:-1]}, log scale)" if label.endswith(")") else f"{label} (log scale)"


# ---- charts ----------------------------------------------------------------------------------------

def _plot_box() -> tuple[float, float, float, float]:
    return MARGIN[3], MARGIN[0], WIDTH - MARGIN[3] - MARGIN[1], HEIGHT - MARGIN[0] - MARGIN[2]


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str,
               log_x: bool = True, log_y: bool = False, colors: dict[str, str] | None = None,
               dashes: dict[str, str] | None = None) -> str:
    """An SVG line chart; each series is [(x, y), ...] and gets a legend entry. `colors` maps a series
    name to its colour (default: `color_map` of the names); `dashes` an SVG dash pattern."""
    series = {name: sorted((x, y) for x, y in values if _plottable(x, log_x) and _plottable(y, log_y))
              for name, values in series.items()}
    points = [point for values in series.values() for point in values]
    if not points:
        return f'<p class="empty">{html.escape(title)}: no data</p>'
    if colors is None:
        keys = color_map(series)
        colors = {name: keys[implementation(name)] for name in series}
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x_axis = axis(min(xs), max(xs), log_x)
    y_axis = axis(min(ys), max(ys), True) if log_y else axis(min(0.0, min(ys)), max(ys) * 1.05, False)
    at = _placer(x_axis, y_axis)
    parts = [_frame(title, _axis_label(x_label, log_x), _axis_label(y_label, log_y))]
    parts += _ticks(x_axis, y_axis, at)
    for n, (name, values) in enumerate(series.items()):
        if not values:
            continue
        color, dash = colors.get(name, "#000"), (dashes or {}).get(name, "")
        style = f' stroke-dasharray="{dash}"' if dash else ""
        coords = [at(x, y) for x, y in values]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{style} points="{path}"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in coords]
        parts.append(_legend(n, name, color, f'<line x1="0" x2="18" y1="-4" y2="-4" stroke="{color}" '
                                              f'stroke-width="2"{style}/>'))
    return _svg(parts)


def bar_chart(title: str, bars: list[tuple], y_label: str, colors: dict[str, str] | None = None,
              x_label: str = "") -> str:
    """An SVG bar chart of (label, value) or (label, value, implementation) entries; a bar's colour is
    its implementation's (default: its label's) in `colors` (default: `color_map` of them)."""
    bars = [(bar[0], bar[1], bar[2] if len(bar) > 2 else bar[0]) for bar in bars if bar[1] is not None]
    if not bars:
        return f'<p class="empty">{html.escape(title)}: no data</p>'
    colors = colors or color_map(key for _, _, key in bars)
    left, top, plot_w, plot_h = _plot_box()
    y_axis = axis(min(0.0, *(v for _, v, _ in bars)), max(v for _, v, _ in bars) * 1.1, False)
    at = _placer(axis(0.0, 1.0, False), y_axis)
    parts = [_frame(title, x_label, y_label)] + _ticks(None, y_axis, at)
    slot = plot_w / len(bars)
    for n, (label, value, key) in enumerate(bars):
        color = colors.get(implementation(key), "#000")
        x, y = left + n * slot + slot * 0.15, at(0.0, value)[1]
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" height="{top + plot_h - y:.1f}" '
                     f'fill="{color}"/>')
        parts.append(f'<text x="{x + slot * 0.35:.1f}" y="{y - 4:.1f}" text-anchor="middle" '
                     f'font-size="11">{value:.3g}</text>')
        lines = "".join(f'<tspan x="{x + slot * 0.35:.1f}" dy="{0 if i == 0 else 12}">{html.escape(word)}</tspan>'
                        for i, word in enumerate(str(label).split(" ")))
        parts.append(f'<text y="{top + plot_h + 14:.1f}" text-anchor="middle" font-size="10">{lines}</text>')
    for n, key in enumerate(dict.fromkeys(key for _, _, key in bars)):
        color = colors.get(implementation(key), "#000")
        parts.append(_legend(n, key, color, f'<rect x="4" y="-9" width="10" height="10" fill="{color}"/>'))
    return _svg(parts)


def _plottable(value, log: bool) -> bool:
    return value is not None and (value > 0 or not log)


def _placer(x_axis: Axis, y_axis: Axis):
    left, top, plot_w, plot_h = _plot_box()

    def at(x: float, y: float) -> tuple[float, float]:
        return left + plot_w * x_axis.fraction(x), top + plot_h * (1 - y_axis.fraction(y))
    return at


def _svg(parts: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">' + "".join(parts) + "</svg>")


def _frame(title: str, x_label: str, y_label: str) -> str:
    left, top, plot_w, plot_h = _plot_box()
    return (f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">'
            f'{html.escape(title)}</text>'
            f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>'
            f'<text class="x-label" x="{left + plot_w / 2}" y="{HEIGHT - 6}" text-anchor="middle" '
            f'font-size="12">{html.escape(x_label)}</text>'
            f'<text class="y-label" transform="translate(14,{top + plot_h / 2}) rotate(-90)" text-anchor="middle" '
            f'font-size="12">{html.escape(y_label)}</text>')


def _ticks(x_axis: Axis | None, y_axis: Axis, at) -> list[str]:
    """Grid lines, tick marks and tick labels: labelled ticks get all three, minor ones a short mark."""
    left, top, plot_w, plot_h = _plot_box()
    bottom, out = top + plot_h, []
    for t in y_axis.ticks + y_axis.minor:
        y, major = at(1.0 if x_axis is None else x_axis.low, t)[1], t in y_axis.ticks
        out.append(f'<line x1="{left - (5 if major else 3)}" x2="{left}" y1="{y:.1f}" y2="{y:.1f}" stroke="#888"/>')
        if major:
            out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                       f'<text class="y-tick" x="{left - 7}" y="{y + 4:.1f}" text-anchor="end" '
                       f'font-size="11">{tick_label(t)}</text>')
    for t in [] if x_axis is None else x_axis.ticks + x_axis.minor:
        x, major = at(t, y_axis.low)[0], t in x_axis.ticks
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" y2="{bottom + (5 if major else 3)}" stroke="#888"/>')
        if major:
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}" stroke="#eee"/>'
                       f'<text class="x-tick" x="{x:.1f}" y="{bottom + 17}" text-anchor="middle" '
                       f'font-size="11">{tick_label(t)}</text>')
    return out


def _legend(n: int, name: str, color: str, sample: str) -> str:
    x, y = WIDTH - MARGIN[1] + 10, MARGIN[0] + 10 + 16 * n
    return (f'<g transform="translate({x},{y})">{sample}<text x="24" y="0" font-size="11" fill="{color}">'
            f'{html.escape(name)}</text></g>')


# ---- figures and tables ----------------------------------------------------------------------------

def _series(rows, key_name, x, y) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list] = {}
    for row in rows:
        if y in row and x in row:
            series.setdefault(str(key_name(row)), []).append((row[x], row[y]))
    return series


def _impl(row: dict) -> str:
    return str(row.get("impl", row.get("attn", "")))


def _memory_chart(title: str, rows: list[dict], column: str, colors: dict[str, str]) -> str:
    """Peak memory per implementation; points that were not measured are left out and said so."""
    measured = [r for r in rows if _measured(r.get(column))]
    skipped = [r for r in rows if column in r and not _measured(r.get(column))]
    series = _series(measured, _impl, "seqlen", column)
    chart = line_chart(title, series, "sequence length (tokens)", "peak memory (MB)",
                       colors={name: colors[implementation(name)] for name in series})
    if skipped:
        reasons = "; ".join(dict.fromkeys(memory_reason(r, column) for r in skipped))
        chart += f'<p class="note">{len(skipped)} of {len(skipped) + len(measured)} points left out: ' \
                 f'{html.escape(reasons)}</p>'
    return chart


def figures(rows: list[dict], colors: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(section heading, SVG or note) for every plot the full suite feeds; one colour per implementation
    across all of them (`colors`, default `color_map` of every implementation in `rows`)."""
    colors = colors or color_map(_impl(r) for r in rows if _impl(r))
    scaling = [r for r in rows if r.get("section") == "scaling"]
    decode = [r for r in rows if r.get("section") == "decode"]
    generate = [r for r in rows if r.get("section") == "generate"]
    by_impl = lambda series: {name: colors[implementation(name)] for name in series}  # noqa: E731
    time = _series(scaling, _impl, "seqlen", "median_ms")
    speedup = _series([r for r in scaling if r["impl"] != "sdpa"], _impl, "seqlen", "x_sdpa")
    names = {f"{r['impl']} {r['format']}": r for r in decode}
    bandwidth = _series(decode, lambda r: f"{r['impl']} {r['format']}", "kv_len", "gb_per_s")
    return [
        ("Time vs sequence length", line_chart("Forward time per backend", time, "sequence length (tokens)",
                                               "median time (ms)", log_y=True, colors=by_impl(time))),
        ("Peak memory vs sequence length", _memory_chart("Forward peak memory per backend", scaling,
                                                         "peak_mem_mb", colors)),
        ("Speedup over SDPA", line_chart("SDPA time / backend time (above 1: faster)", speedup,
                                         "sequence length (tokens)", "speedup (× SDPA)", colors=by_impl(speedup))),
        ("Decode bandwidth per KV format", line_chart(
            "KV cache bytes read per second", bandwidth, "KV length (tokens)", "bandwidth (GB/s)",
            colors={n: colors[implementation(names[n]["impl"])] for n in bandwidth},
            dashes={n: _dash(names[n]["format"]) for n in bandwidth})),
        ("Generation tokens/s", bar_chart("SmolLM2-135M decode tokens/s", [
            (f"{r['attn']} kv={r['kv_cache']}", r.get("decode_tok_s"), r["attn"]) for r in generate],
            "decode speed (tokens/s)", colors, "attention, KV cache")),
    ]


def is_memory(column: str) -> bool:
    return column.endswith(("_mb", "_gb"))


def _measured(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def memory_reason(row: dict, column: str) -> str:
    """Why a memory cell is empty: the row's own reason if it carries one, else what the method implies."""
    for key in (f"{column}_reason", f"{column.rsplit('_', 1)[0]}_reason", "mem_reason", "memory_reason"):
        if row.get(key):
            return str(row[key])
    if row.get(column) is None and row.get("error"):
        return "not measured: the run failed (see error)"
    device, method = str(row.get("device", "this device")).split(":")[0], str(row.get("mem_method", ""))
    if "peak" not in column and "mem" not in column:
        return f"not measured: {column} was recorded as {row.get(column)}"
    if "ru_maxrss" in method or "peak RSS" in method or device == "cpu":  # ru_maxrss: rows of earlier runs
        grew = " (the process's peak RSS did not grow)" if row.get(column) is not None else ""
        return f"not measured: no peak-memory counter on {device}{grew}"
    if method:
        return f"not measured: {method} read {row.get(column)}"
    return f"not measured on {device}"


def table(rows: list[dict], skip=("section", "device", "repeats")) -> str:
    """The rows as an HTML table. A memory cell that is 0 or missing is empty, marked with a footnote
    letter that the notes under the table explain (the reason is also the cell's tooltip)."""
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in skip and not c.endswith("_reason")]
    notes: dict[str, str] = {}

    def cell(row: dict, column: str) -> str:
        value = row.get(column, "")
        if not is_memory(column) or _measured(value):
            return f"<td>{html.escape(str(value))}</td>"
        reason = memory_reason(row, column)
        mark = notes.setdefault(reason, chr(ord("a") + len(notes) % 26))
        return f'<td class="unmeasured" title="{html.escape(reason)}"><sup>{mark}</sup></td>'

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(cell(r, c) for c in columns) + "</tr>" for r in rows)
    foot = "".join(f'<p class="note"><sup>{mark}</sup> {html.escape(reason)}</p>' for reason, mark in notes.items())
    return f"<table><tr>{head}</tr>{body}</table>{foot}"


STYLE = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1220px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}.figs{display:flex;flex-wrap:wrap;gap:16px}
.fig{border:1px solid #ddd;padding:6px;max-width:560px}table{border-collapse:collapse;font-size:12px;margin:8px 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}td.unmeasured{color:#999}
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
