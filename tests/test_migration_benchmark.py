"""from mfa_hf.benchmark import run_suite, compare_vs_sdpa (tiny shapes on CPU; timings are never asserted,
only that each row was measured and that our output matches SDPA's)."""

from __future__ import annotations

import sys
import types

import pytest

from mfa_hf.benchmark import compare_vs_sdpa, measure, programmatic, run_suite

TINY = dict(seq_lengths=[24, 40], head_dims=[16], num_heads_list=[2], batch_sizes=[1], dtypes=["float32"],
            device="cpu", repeats=1, verbose=False)


def test_run_suite_rows(monkeypatch, capsys):
    monkeypatch.setattr(programmatic, "WINDOW_MIN_SEQLEN", 40)
    rows = run_suite(**{**TINY, "verbose": True}, include_backward=True, as_frame=False)
    # per length: (not causal, causal) x (fwd, fwd+bwd), and a window row from 40 tokens on
    assert len(rows) == 2 * 4 + 1
    assert [r["pass"] for r in rows[:4]] == ["fwd", "fwd+bwd", "fwd", "fwd+bwd"]
    for row in rows:
        assert set(programmatic.COLUMNS) <= set(row)
        assert row["mfa_ms"] > 0 and row["served_by"] not in ("", "?")
        if row["window"] is None:
            assert row["sdpa_ms"] > 0 and row["speedup"] > 0
            assert row["max_diff"] < 1e-4, row  # ours and SDPA compute the same attention
    window_row = rows[-1]
    assert window_row["window"] == 10 and window_row["causal"] and window_row["sdpa_ms"] is None
    assert window_row["served_by"] == "torch"  # SDPA has no window: ours
    assert "[9/9]" in capsys.readouterr().err


def test_run_suite_returns_a_frame_when_pandas_is_importable(monkeypatch):
    made = []
    fake = types.ModuleType("pandas")
    fake.DataFrame = lambda rows, columns: made.append((rows, columns)) or "frame"
    monkeypatch.setitem(sys.modules, "pandas", fake)
    assert run_suite(**TINY, include_causal=False, include_window=False) == "frame"
    rows, columns = made[0]
    assert columns == programmatic.COLUMNS and len(rows) == 2
    assert isinstance(run_suite(**TINY, include_causal=False, include_window=False, as_frame=False), list)


def test_run_suite_without_pandas_gives_dicts(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    rows = run_suite(**TINY, include_causal=False, include_window=False)
    assert isinstance(rows, list) and isinstance(rows[0], dict)
    with pytest.raises(ImportError):
        run_suite(**TINY, include_causal=False, include_window=False, as_frame=True)


def test_compare_vs_sdpa_prints_the_table(capsys):
    summary = compare_vs_sdpa(seq_lengths=[24, 48], dtype="float32", device="cpu", repeats=1)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# mfa_hf.flash_attention vs SDPA on cpu")
    assert out[1].split() == ["seqlen", "dtype", "sdpa_ms", "mfa_ms", "speedup", "max_diff", "served_by"]
    assert [line.split()[0] for line in out[3:]] == ["24", "48"]
    assert summary["num_tests"] == 2 and len(summary["results"]) == 2
    assert summary["min_speedup"] <= summary["average_speedup"] <= summary["max_speedup"]
    assert summary["crossover_seq_len"] in (None, 24, 48)


@pytest.mark.parametrize("argument, value, message", [
    ("seq_lengths", [], r"seq_lengths: expected a non-empty list of ints >= 1, got \[\]"),
    ("head_dims", [0], r"head_dims: expected a non-empty list of ints >= 1, got \[0\]"),
    ("dtypes", ["half-ish"], r"dtypes: expected torch dtype names like 'float16', got 'half-ish'"),
    ("repeats", 0, r"repeats: expected an int >= 1, got 0"),
])
def test_bad_arguments_are_named(argument, value, message):
    with pytest.raises(ValueError, match=message):
        run_suite(**{**TINY, argument: value})


def test_cli_standard_suite_with_mps_flash_attn_flags_and_json(tmp_path, capsys):
    import json

    from mfa_hf.benchmark.__main__ import main

    path = tmp_path / "rows.json"
    assert main(["--suite", "standard", "--device", "cpu", "--seq-lengths", "24", "--dtypes", "float32",
                 "--backward", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert [(r["seqlen"], r["dtype"], r["causal"], r["pass"]) for r in rows] == [
        (24, "float32", False, "fwd"), (24, "float32", False, "fwd+bwd"),
        (24, "float32", True, "fwd"), (24, "float32", True, "fwd+bwd")]
    assert all(r["max_diff"] < 1e-4 for r in rows)
    out = capsys.readouterr().out
    assert out.startswith("# suite standard on cpu") and "speedup" in out


def test_cli_refuses_grid_flags_for_fixed_suites(capsys):
    from mfa_hf.benchmark.__main__ import main

    with pytest.raises(SystemExit):
        main(["--suite", "quick", "--seq-lengths", "512"])
    assert "--seq-lengths" in capsys.readouterr().err


def test_generate_report_writes_the_summary(tmp_path, capsys):
    from mfa_hf.benchmark import generate_report

    rows = run_suite(**TINY, include_causal=False, include_window=False, as_frame=False)
    path = generate_report(rows, tmp_path / "r.html", title="My <report>")
    page = path.read_text()
    assert "<title>My &lt;report&gt;</title>" in page and "Total benchmarks: 2" in page and "Average speedup" in page
    assert f"Report written to {path}" in capsys.readouterr().out
    with pytest.raises(TypeError, match="results"):
        generate_report([object()], tmp_path / "x.html")


def test_timings_and_ratios_never_round_a_positive_value_to_zero(monkeypatch):
    """A slow outlier (a GC pause in a one-repeat run) once made speedup round(0.004, 2) == 0.0."""
    from mfa_hf.benchmark import measure

    assert measure.ratio(0.015, 3.9) > 0 and measure.ratio(0.015, 3.9) == pytest.approx(0.015 / 3.9, rel=1e-2)
    assert measure.ratio(1e-4, 1e3) > 0 and measure.ratio(2e3, 1e-3) == 2e6
    assert measure.significant(0.00012345) == 0.0001234 and measure.significant(0.0) == 0.0
    ticks = iter([0.0, 2e-7, 1.0, 1.0 + 3e-7])  # sub-microsecond calls (perf_counter, in seconds)
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(ticks))
    timing = measure.median_ms(lambda: None, "cpu", repeats=2, warmup=0)
    assert 0 < timing["min_ms"] <= timing["median_ms"] and timing["min_ms"] == pytest.approx(2e-4)


def test_a_slow_outlier_gives_a_small_positive_speedup(monkeypatch):
    timings = iter([{"median_ms": 4.0}, {"median_ms": 0.015}])  # ours first, then SDPA
    fake = lambda *args, **kwargs: next(timings)  # noqa: E731
    monkeypatch.setattr(programmatic, "median_ms", fake)
    monkeypatch.setattr(measure, "median_ms", fake)  # ours: timed_then_named's timing
    spec = dict(batch=1, heads=2, seqlen=24, head_dim=16, dtype="float32", device="cpu", repeats=1,
                window=None, causal=False, **{"pass": "fwd"})
    row = programmatic.measure_row(spec)
    assert row["sdpa_ms"] == 0.015 and 0 < row["speedup"] < 0.01
