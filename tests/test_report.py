"""The HTML benchmark report renders every section from suite rows, self-contained, and the full
suite's plan/derivations feed it. The real run (minutes) is a docs step: docs/benchmark-report.png."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from mfa_hf.benchmark import report, suite_full
from mfa_hf.benchmark.__main__ import main

ROWS = [
    {"section": "scaling", "impl": "sdpa", "seqlen": 256, "median_ms": 2.0, "peak_mem_mb": 9.0},
    {"section": "scaling", "impl": "mfa[torch]", "seqlen": 256, "median_ms": 4.0, "peak_mem_mb": 3.0},
    {"section": "scaling", "impl": "sdpa", "seqlen": 1024, "median_ms": 20.0, "peak_mem_mb": 90.0},
    {"section": "scaling", "impl": "mfa[torch]", "seqlen": 1024, "median_ms": 10.0, "peak_mem_mb": 6.0},
    {"section": "decode", "impl": "mfa", "format": "int8", "kv_len": 2048, "median_ms": 1.0, "cache_mb": 2.0},
    {"section": "decode", "impl": "mfa", "format": "nf4", "kv_len": 8192, "median_ms": 2.0, "cache_mb": 4.0},
    {"section": "generate", "attn": "sdpa", "kv_cache": "none", "decode_tok_s": 30.0},
    {"section": "generate", "attn": "mps_flash", "kv_cache": "none", "decode_tok_s": 25.0},
    {"section": "generate", "attn": "mps_flash", "kv_cache": "int8", "error": "no <cache> here"},
]


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.h2, self.open, self._in_h2 = [], [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in ("meta", "rect", "circle", "line", "polyline", "br"):
            self.open.append(tag)
        self._in_h2 = tag == "h2"

    def handle_startendtag(self, tag, attrs):  # <rect .../> in SVG: nothing left open
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()
        self._in_h2 = False

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data)


def _parse(page: str) -> _Collector:
    collector = _Collector()
    collector.feed(page)
    return collector


def test_report_has_every_plot_the_metadata_and_escapes_text():
    rows = suite_full._derive([dict(r) for r in ROWS])
    page = report.render(rows, "cpu")
    parsed = _parse(page)
    assert parsed.open == [], parsed.open  # every element closed
    assert parsed.h2[:5] == ["Time vs sequence length", "Peak memory vs sequence length", "Speedup over SDPA",
                             "Decode bandwidth per KV format", "Generation tokens/s"]
    assert sum(tag == "svg" for tag, _ in parsed.tags) == 5
    assert sum(tag == "polyline" for tag, _ in parsed.tags) == 2 + 2 + 1 + 2  # series per line chart
    assert "no &lt;cache&gt; here" in page and "<cache>" not in page
    for key in ("device", "torch", "transformers", "diffusers", "date"):
        assert f"<dt>{key}</dt>" in page
    assert "src=" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_derived_speedup_and_bandwidth():
    rows = suite_full._derive([dict(r) for r in ROWS])
    assert [r.get("x_sdpa") for r in rows[:4]] == [1.0, 0.5, 1.0, 2.0]
    assert rows[4]["gb_per_s"] == pytest.approx(2 * 2**20 / 1e-3 / 1e9, rel=1e-3)


def test_empty_sections_say_so_instead_of_failing():
    page = report.render([{"section": "scaling", "impl": "sdpa", "seqlen": 256, "error": "boom"}], "cpu")
    assert page.count('class="empty"') == 5


def test_plan_covers_every_section_on_cpu():
    sections = [section for section, _, _ in suite_full.plan("cpu", quick=True)]
    assert {"scaling", "decode", "generate"} == set(sections)
    assert suite_full.progress_bar(3, 12, width=12) == "[###.........] 3/12"


def test_cli_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.setattr(suite_full, "run", lambda device, quick, progress: suite_full._derive([dict(r) for r in ROWS]))
    out = tmp_path / "report.html"
    assert main(["--suite", "full", "--device", "cpu", "--output", str(out)]) == 0
    assert _parse(out.read_text()).h2[0] == "Time vs sequence length"


def _texts(svg: str, css_class: str) -> list[str]:
    return re.findall(rf'<text class="{css_class}"[^>]*>([^<]*)</text>', svg)


def _legend_colors(svg: str) -> dict[str, str]:
    return dict((name, color) for color, name in re.findall(r'<g transform[^>]*>.*?<text [^>]*fill="(#\w+)">'
                                                            r'([^<]*)</text></g>', svg))


def test_log_axes_are_labelled_and_ticked_at_powers_of_ten():
    series = {"sdpa": [(256, 0.01), (65536, 900.0)], "mfa[torch]": [(1024, 0.2), (16384, 40.0)]}
    svg = report.line_chart("t", series, "sequence length (tokens)", "median time (ms)", log_y=True)
    assert _texts(svg, "x-label") == ["sequence length (tokens, log scale)"]
    assert _texts(svg, "y-label") == ["median time (ms, log scale)"]
    assert {"0.01", "0.1", "1", "10", "100", "1k"} <= set(_texts(svg, "y-tick"))  # decades, not min/max
    assert {"1k", "10k"} <= set(_texts(svg, "x-tick"))
    assert "256" not in _texts(svg, "x-tick")  # ticks are round values, not the data points
    # under three decades: 2x and 5x steps as well, so a narrow axis still reads
    assert report.axis(256, 4096, log=True).ticks == [200, 500, 1000, 2000, 5000]
    assert [report.tick_label(t) for t in report.axis(0, 9.4, log=False).ticks] == ["0", "2", "4", "6", "8", "10"]


def test_one_colour_per_implementation_in_every_chart():
    rows = suite_full._derive([dict(r) for r in ROWS[1::-1] + ROWS[3:1:-1] + ROWS[4:]])  # mfa[torch] first
    page = report.render(rows, "cpu")
    legends = [_legend_colors(svg) for svg in re.findall(r"<svg.*?</svg>", page)]
    time, memory, speedup, decode, generate = legends
    assert time["mfa[torch]"] == memory["mfa[torch]"] == speedup["mfa[torch]"]  # alone in speedup: still its own
    assert time["sdpa"] == memory["sdpa"] == generate["sdpa"] != time["mfa[torch]"]
    assert decode["mfa int8"] == decode["mfa nf4"] == generate["mps_flash"]  # mps_flash is mfa's attention
    assert report.color_map(["zeta", "sdpa", "alpha"]) == report.color_map(["alpha", "sdpa", "zeta", "alpha"])
    assert report.color_map(["sdpa"])["sdpa"] == report.color_map(["mfa", "flex", "sdpa"])["sdpa"]


def test_unmeasured_memory_is_an_empty_cell_with_its_reason():
    rows = [{"section": "scaling", "impl": "sdpa", "seqlen": 256, "median_ms": 2.0, "peak_mem_mb": 0.0,
             "device": "cpu", "mem_method": "peak RSS growth of a subprocess"},
            {"section": "scaling", "impl": "sdpa", "seqlen": 512, "median_ms": 4.0, "peak_mem_mb": None,
             "device": "cpu"},
            {"section": "scaling", "impl": "sdpa", "seqlen": 1024, "median_ms": 9.0, "peak_mem_mb": 0,
             "peak_mem_mb_reason": "counter reset failed", "device": "cuda"},
            {"section": "scaling", "impl": "sdpa", "seqlen": 2048, "median_ms": 30.0, "peak_mem_mb": 12.5,
             "device": "cpu"}]
    page = report.render(rows, "cpu")
    table = page[page.index("<table>"):]
    header = re.findall(r"<th>([^<]*)</th>", table)
    column = header.index("peak_mem_mb")
    cells = [re.findall(r"<td([^>]*)>(.*?)</td>", tr)[column] for tr in re.findall(r"<tr>(.*?)</tr>", table)[1:]]
    assert [re.sub(r"<[^>]+>", "", text) for _, text in cells[:3]] == ["a", "b", "c"]  # footnote marks only
    assert cells[3][1] == "12.5"
    assert "no peak-memory counter on cpu" in cells[0][0] and "peak RSS" in cells[0][0]
    assert "not measured: no peak-memory counter on cpu" in cells[1][0]
    assert "counter reset failed" in cells[2][0] and "peak_mem_mb_reason" not in header
    assert "<sup>c</sup> counter reset failed" in table
    assert not re.search(r"<td>(0|0\.0|None)</td>", page)
    assert "3 of 4 points left out" in page  # and the memory chart does not plot them at 0


def test_cpu_memory_that_did_not_grow_is_not_reported_as_zero():
    """On CPU the only counter is the process's peak RSS, a high-water mark: calls that stay under a peak set earlier
    (the inputs' creation) read 0 growth, which printed tables showed as 0 MB. It is None with its reason, printed
    as "-", and the HTML report's note says why."""
    from mfa_hf.benchmark.measure import peak_rss_mb, peak_memory
    from mfa_hf.benchmark.table import format_table

    row = peak_memory("cpu", peak_rss_mb() + 1.0)
    assert row["peak_mem_mb"] is None and "peak RSS did not grow" in row["peak_mem_mb_reason"]
    text = format_table([{"impl": "mfa", **row}], ["impl", "peak_mem_mb"])
    assert text.splitlines()[-1].split()[-1] == "-"
    assert "did not grow" in report.memory_reason(row, "peak_mem_mb")
