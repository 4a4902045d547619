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


@pytest.mark.parametrize("argv,expected", [
    (["--device", "nope"], "--device nope: not a torch device"),
    (["--device", "meta"], "--device meta: expected one of cpu, mps, cuda"),
    (["--suite", "standard", "--seq-lengths", "-5"], "argument --seq-lengths: expected an integer >= 1, got '-5'"),
    (["--suite", "standard", "--dtypes", "float64"], "argument --dtypes: invalid choice: 'float64'"),
    (["--output", "/no/such/folder/r.html"], "argument --output: expected a file path in an existing folder"),
    (["--json", "/no/such/folder/r.json"], "argument --json: expected a file path in an existing folder"),
])
def test_bad_arguments_are_usage_errors_before_the_suite_runs(capsys, monkeypatch, argv, expected):
    """Each was a traceback, some only after the whole suite had run (an --output folder that does not exist)."""
    from mfa_hf.benchmark import suite_quick
    from mfa_hf.benchmark.__main__ import main

    monkeypatch.setattr(suite_quick, "run", lambda *a, **k: pytest.fail("the suite ran"))
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and expected in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv,expected", [
    (["missing_script.py"], "missing_script.py: expected a Python script to run"),
    (["--install-pth", "/no/such/folder"], "--install-pth /no/such/folder: expected an existing folder"),
    (["--uninstall-pth", "/no/such/folder"], "--uninstall-pth /no/such/folder: expected an existing folder"),
])
def test_the_flash_attn_shim_command_refuses_in_one_line(capsys, argv, expected):
    from mfa_hf.integrations.flash_attn_shim.__main__ import main

    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_uninstall_pth_says_when_there_was_nothing_to_remove(capsys, tmp_path):
    """It printed 'removed ...' for a file that was never there."""
    from mfa_hf.integrations.flash_attn_shim.__main__ import main

    assert main(["--uninstall-pth", str(tmp_path)]) == 0
    assert "not there, nothing removed" in capsys.readouterr().out


def test_diffusers_rounds_alternate_the_processors_and_take_the_median(monkeypatch):
    """On CPU the default and mfa subprocesses alternate over rounds (a slow spell lands on both); a row's time is
    the median of its rounds and the rounds are listed. Each round also runs one subprocess that interleaves both
    models' forwards; the mfa row's interleaved_ratio is the median of those rounds' pair ratios."""
    from mfa_hf.benchmark import suite_diffusers

    order, times, pair_ratios = [], iter([10.0, 20.0, 30.0, 12.0, 11.0, 18.0] * 2), iter([0.9, 1.2, 1.0] * 2)

    def fake(module, spec):
        order.append(spec["processor"])
        if spec["processor"] == suite_diffusers.INTERLEAVED:
            return {"ratio": next(pair_ratios)}
        return {"median_ms": next(times), "fingerprint": [0.0], "tokens": "t"}

    monkeypatch.setattr(suite_diffusers, "measure_in_subprocess", fake)
    rows = suite_diffusers.run("cpu", True, lambda message: None)
    assert order[:9] == ["default", "mfa", suite_diffusers.INTERLEAVED] * 3
    unet = {row["processor"]: row for row in rows if row["model"] == "unet"}
    assert unet["default"]["median_ms_runs"] == [10.0, 30.0, 11.0] and unet["default"]["median_ms"] == 11.0
    assert unet["mfa"]["median_ms"] == 18.0 and unet["mfa"]["ratio_vs_default"] == suite_diffusers.ratio(18.0, 11.0)
    assert unet["mfa"]["interleaved_ratio_runs"] == [0.9, 1.2, 1.0] and unet["mfa"]["interleaved_ratio"] == 1.0
    assert unet["default"]["interleaved_ratio"] == 1.0


def test_rounds_flag_reaches_a_suite_with_rounds_and_is_refused_elsewhere(monkeypatch, capsys):
    """--rounds N: the diffusers suite runs N alternating rounds; a suite without rounds, or a count below 1, is a
    usage error (one line, exit 2), not an ignored flag."""
    from mfa_hf.benchmark import suite_diffusers

    seen = []
    monkeypatch.setattr(suite_diffusers, "run", lambda device, quick, progress, rounds=None: seen.append(rounds) or [])
    assert cli.main(["--suite", "diffusers", "--device", "cpu", "--rounds", "7"]) == 0 and seen == [7]
    for argv, message in ((["--suite", "quick", "--rounds", "2"], "--suite quick runs no alternating rounds"),
                          (["--suite", "diffusers", "--rounds", "0"], "expected a positive count, got 0")):
        with pytest.raises(SystemExit) as exited:
            cli.main(argv + ["--device", "cpu"])
        assert exited.value.code == 2 and message in capsys.readouterr().err


def test_timed_calls_run_untraced_and_one_traced_call_names_them():
    """A traced call skips the replays (host time no user pays): every timed call runs with the trace off, one call
    after them with it on, and what that call recorded comes back."""
    from mfa_hf import trace
    from mfa_hf.benchmark.measure import timed_then_named

    states = []

    def call():
        states.append(trace.enabled())
        trace.record("torch", "fwd", torch.float32, 8, 1, 1, "")

    timing, calls, _ = timed_then_named(call, "cpu", repeats=4, warmup=2)
    assert states == [False] * 6 + [True] and timing["repeats"] == 4
    assert sum(calls.values()) == 1


def test_generate_streamer_traces_the_prefill_and_one_named_step_only():
    """PrefillTraced: the trace is open until the first new token (the prefill names its kernels), off for the decode
    steps, and on again for the one step named after the timing; the wrapped streamer sees every put."""
    from mfa_hf import trace
    from mfa_hf.benchmark.measure import PrefillTraced

    seen = []

    class Inner:
        def put(self, value):
            seen.append(value)

        def end(self):
            seen.append("end")

    class Model:
        def __call__(self, tokens, **kwargs):
            assert trace.enabled() and kwargs["use_cache"] and tokens.shape == (1, 1)
            trace.record("torch", "decode", torch.float32, 8, 1, 5, "")

    streamer = PrefillTraced(Inner())
    states = [trace.enabled()]
    trace.record("native", "fwd", torch.float32, 8, 4, 4, "")  # the prefill
    for token in ("prompt", 1, 2, 3):
        streamer.put(token)
        states.append(trace.enabled())
    streamer.end()
    assert states == [True, True, False, False, False] and seen == ["prompt", 1, 2, 3, "end"]
    streamer.named_step(Model(), torch.zeros(1, 6, dtype=torch.long), {"cache": None})
    assert not trace.enabled()
    assert trace.served_by(streamer.calls) == {("native", "fwd"): 1, ("torch", "decode"): 1}
