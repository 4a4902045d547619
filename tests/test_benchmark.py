"""The benchmark CLI runs and prints its table (tiny shapes; timings are never asserted)."""

import pytest
import torch

from mfa_hf.benchmark import __main__ as cli
from mfa_hf.benchmark import suite_quick
from mfa_hf.benchmark.table import format_table


def test_quick_suite_prints_a_table(monkeypatch, capsys):
    monkeypatch.setitem(suite_quick.SHAPES, "cpu", [(1, 2, 64, 16, True)])
    assert cli.main(["--suite", "quick", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("# suite quick on cpu")
    rows = [line.split() for line in lines[3:]]
    assert {(row[0], row[1]) for row in rows} == {("sdpa", "fwd"), ("mfa[torch]", "fwd"),
                                                  ("sdpa", "fwd+bwd"), ("mfa[torch]", "fwd+bwd")}
    assert all(row[-1] in ("torch", "torch.nn.functional") for row in rows)
    assert "[4/4]" in captured.err  # progress


def test_table_formats_numbers_and_text():
    text = format_table([{"name": "a", "ms": 1.5}, {"name": "bb", "ms": 12.25}])
    assert text.splitlines()[0].split() == ["name", "ms"]
    assert text.splitlines()[3].split() == ["bb", "12.25"]


def test_a_suite_for_another_device_is_a_usage_error(capsys):
    """--suite cuda on a machine without CUDA: one line and exit 2 (was a ValueError traceback)."""
    from mfa_hf.benchmark.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exited:
        main(["--suite", "cuda", "--device", "cpu"])
    assert exited.value.code == 2 and "--device: the cuda suite needs a cuda device" in capsys.readouterr().err


def test_diffusers_rounds_alternate_the_processors_and_take_the_median(monkeypatch):
    """On CPU the default and mfa subprocesses alternate over rounds (a slow spell lands on both); a row's time is
    the median of its rounds and the rounds are listed."""
    from mfa_hf.benchmark import suite_diffusers

    order, times = [], iter([10.0, 20.0, 30.0, 12.0, 11.0, 18.0] * 2)

    def fake(module, spec):
        order.append(spec["processor"])
        return {"median_ms": next(times), "fingerprint": [0.0], "tokens": "t"}

    monkeypatch.setattr(suite_diffusers, "measure_in_subprocess", fake)
    rows = suite_diffusers.run("cpu", True, lambda message: None)
    assert order[:6] == ["default", "mfa"] * 3
    unet = {row["processor"]: row for row in rows if row["model"] == "unet"}
    assert unet["default"]["median_ms_runs"] == [10.0, 30.0, 11.0] and unet["default"]["median_ms"] == 11.0
    assert unet["mfa"]["median_ms"] == 18.0 and unet["mfa"]["ratio_vs_default"] == suite_diffusers.ratio(18.0, 11.0)
