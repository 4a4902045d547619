"""`mfa-hf doctor`: a quick run writes a passing report (JSON schema and markdown), a planted
compile error and a planted wrong result are reported as failures with exit code 1, a machine
without mps or clang is told what to install, usage errors exit 2, and the variant enumeration
covers what it promises. On Linux everything runs through the MSL emulator, as the doctor does
by itself there; on a Mac the same tests run the real kernels."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mfa_hf import cli
from mfa_hf.doctor import correctness, covering, variants
from mfa_hf.kernels.metal import loader

EMULATED = not torch.backends.mps.is_available()
FAMILIES = {"forward", "backward", "decode", "append"}
DTYPE_NAMES = ("f16", "bf16", "f32")


def _needs_a_runtime():
    if not EMULATED:
        return
    from mfa_hf.kernels.metal.emulator import CompilerNotFound, find_compiler

    try:
        find_compiler()
    except CompilerNotFound as error:
        pytest.skip(f"no mps device and no clang for the emulator: {error}")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """`mfa-hf doctor --quick` in a fresh Python, as a user would run it (the doctor itself
    switches the emulator on where there is no mps device)."""
    _needs_a_runtime()
    out = tmp_path_factory.mktemp("doctor") / "report"
    env = {k: v for k, v in os.environ.items() if k not in ("MFA_METAL_EMULATOR", "MFA_BACKEND", "PYTORCH_MPS_FAST_MATH")}
    result = subprocess.run([sys.executable, "-m", "mfa_hf.doctor", "--quick", "--runs", "3", "--out", str(out)],
                            cwd=out.parent, env=env, capture_output=True, text=True, timeout=900)
    return result, out


def test_quick_run_passes_and_says_so(quick_report):
    result, out = quick_report
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2] == f"report: {out / 'report.md'}"
    assert lines[-1].startswith("PASS: ") and "kernel variants compiled" in lines[-1], lines


def test_quick_report_json_schema(quick_report):
    _, out = quick_report
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "mfa-hf-doctor/1"
    assert report["command"].startswith("mfa-hf doctor --quick")
    env = report["environment"]
    for key in ("chip", "macos", "python", "platform", "msl_version", "fast_math", "emulated", "runtime", "compiler"):
        assert env[key] not in (None, ""), key
    assert set(env["versions"]) == {"torch", "transformers", "diffusers", "mfa_hf"}
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or env["versions"]["torch"] == torch.__version__
    assert env["emulated"] is EMULATED and env["fast_math"] is False and report["modes"] == ["safe"]
    if EMULATED:
        assert "MFA_METAL_EMULATOR=1" in env["runtime"]

    compiled = report["compile"]
    assert {row["family"] for row in compiled} == FAMILIES
    assert {row["source"] for row in compiled} == {"attention_forward.metal", "attention_backward.metal",
                                                   "attention_decode.metal", "kvcache_append.metal"}
    for family in FAMILIES:
        ids = [row["id"] for row in compiled if row["family"] == family]
        assert all(any(f" {name} " in f" {i} " for i in ids) for name in DTYPE_NAMES), (family, ids)
    for row in compiled:
        assert row["status"] == "passed" and row["error"] is None and row["mode"] == "safe", row
        assert row["kernels"], row
        for kernel in row["kernels"]:
            assert kernel["threads_launched"] in (32, 64, 128, 256), kernel
            assert kernel["max_threads_per_threadgroup"] >= kernel["threads_launched"], kernel

    checks = report["correctness"]
    assert {row["kind"] for row in checks} == {"forward+backward", "forward", "varlen", "decode"}
    assert len(checks) == len(correctness.CHECKS)
    assert all(row["status"] == "passed" and row["mode"] == "safe" for row in checks), checks
    for needed in ("left-padded", "no visible key", "empty cache", "GQA", "sinks", "softcap", "varlen", "nf4",
                   "int8", "fp8_e4m3", "fp8_e5m2"):
        assert any(needed in row["id"] for row in checks), needed

    timing = report["timing"]
    if EMULATED:
        assert timing and all(row["status"] == "not measured (emulated)" and row["ours_ms"] is None for row in timing)
    summary = report["summary"]
    assert summary["passed"] is True and summary["fatal"] is None
    assert summary["compile"] == {"total": len(compiled), "passed": len(compiled), "failed": 0}
    assert summary["verdict"].startswith("PASS: ")


def test_quick_report_markdown(quick_report):
    _, out = quick_report
    text = (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert text.startswith("# mfa-hf doctor report")
    assert f"**{report['summary']['verdict']}**" in text
    for heading in ("## Environment", "## Compile:", "## Correctness:", "## Timing:", "## Summary"):
        assert heading in text, heading
    assert "bug report" in text and "FAILED" not in text
    assert text.count("| compiled OK |") == len(report["compile"])
    if EMULATED:
        assert "not measured (emulated)" in text


@pytest.fixture
def emulator_if_no_mps(monkeypatch):
    """In-process runs: the doctor sets MFA_METAL_EMULATOR itself and restores it; monkeypatch makes
    sure of that for every test."""
    _needs_a_runtime()
    monkeypatch.delenv("MFA_METAL_EMULATOR", raising=False)
    monkeypatch.delenv("PYTORCH_MPS_FAST_MATH", raising=False)


def test_planted_compile_error_fails_with_the_compilers_message(emulator_if_no_mps, monkeypatch, tmp_path, capsys):
    """Every source gets an #error; the head dim 248 is one no other test compiles, so these variants
    come fresh from the compiler (the loader remembers failures per variant for the process)."""
    real_source = loader.kernel_source

    def broken(name):
        return "#error planted by test_doctor\n" + real_source(name)

    monkeypatch.setattr(loader, "kernel_source", broken)
    monkeypatch.setattr(loader, "_libraries", {})  # the failures the loader remembers go with the test
    monkeypatch.setattr(variants, "QUICK_HEAD_DIMS", ((248, 248),))
    code = cli.main(["doctor", "--quick", "--checks", "compile", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert out.strip().splitlines()[-1].startswith("FAIL: 0/"), out
    report = json.loads((tmp_path / "report.json").read_text())
    rows = report["compile"]
    assert {row["family"] for row in rows} == FAMILIES
    assert all(row["status"] == "failed" and "planted by test_doctor" in row["error"] for row in rows), rows
    assert report["summary"]["passed"] is False and report["summary"]["compile"]["failed"] == len(rows)
    text = (tmp_path / "report.md").read_text()
    assert "**FAILED**" in text and "### Compile failures (full messages)" in text and "planted by test_doctor" in text
    assert os.environ.get("MFA_METAL_EMULATOR") is None  # restored


def test_planted_wrong_result_fails_the_check(emulator_if_no_mps, monkeypatch, tmp_path, capsys):
    """The reference shifted by 0.5: the kernel's (right) output now disagrees, and the doctor must say so."""
    from mfa_hf.kernels import reference

    real = reference.attention_reference

    def shifted(*args, **kwargs):
        out, *rest = real(*args, **kwargs)
        return (out + 0.5, *rest)

    monkeypatch.setattr(reference, "attention_reference", shifted)
    picked = [next(c for c in correctness.CHECKS if c.kind == kind) for kind in ("forward", "decode")]
    monkeypatch.setattr(correctness, "CHECKS", picked)
    code = cli.main(["doctor", "--checks", "correctness", "--out", str(tmp_path)])
    assert code == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("FAIL: ")
    report = json.loads((tmp_path / "report.json").read_text())
    rows = report["correctness"]
    assert [row["id"] for row in rows] == [c.id for c in picked]
    for row in rows:
        assert row["status"] == "failed" and row["detail"].startswith("wrong result: out: max error"), row
    assert report["compile"] == [] and report["summary"]["correctness"]["failed"] == len(picked)


def test_without_mps_and_clang_it_says_what_to_install(monkeypatch, tmp_path, capsys):
    from mfa_hf.kernels.metal import emulator
    from mfa_hf.kernels.metal.emulator.compiler import INSTALL_HINT

    def no_clang():
        raise emulator.CompilerNotFound(INSTALL_HINT)

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(emulator, "find_compiler", no_clang)
    monkeypatch.delenv("MFA_METAL_EMULATOR", raising=False)
    code = cli.main(["doctor", "--quick", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 1
    assert "apt-get install" in captured.err and "clang" in captured.err
    report = json.loads((tmp_path / "report.json").read_text())
    assert "apt-get install" in report["summary"]["fatal"] and report["summary"]["passed"] is False
    assert report["compile"] == [] and report["correctness"] == []
    assert os.environ.get("MFA_METAL_EMULATOR") is None


def test_no_time_with_only_timing_checks_is_a_usage_error(tmp_path, capsys):
    """It checked nothing and said 'PASS: 0/0'."""
    assert cli.main(["doctor", "--quick", "--checks", "timing", "--no-time", "--out", str(tmp_path)]) == 2
    assert "--no-time with --checks timing: nothing left to check" in capsys.readouterr().err


@pytest.mark.parametrize("emulated", [False, True])
def test_write_route_table_off_a_mac_is_a_usage_error_before_any_check(monkeypatch, tmp_path, capsys, emulated):
    """The README: Mac only, exit 2 on a usage error. It ran every check first (minutes), then failed with exit 1."""
    from mfa_hf.doctor import route_table

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: emulated)
    if emulated:  # mps "available" through the emulator: its timings mean nothing either
        monkeypatch.setenv("MFA_METAL_EMULATOR", "1")
    ran = []
    monkeypatch.setattr("mfa_hf.doctor.run_pass", lambda *a: ran.append(a))
    code = cli.main(["doctor", "--quick", "--write-route-table", "--out", str(tmp_path)])
    assert code == 2 and not ran
    assert f"mfa-hf doctor: error: {route_table.NOT_A_MAC}" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_emulated_time_runs_small_shapes_and_claims_nothing(emulator_if_no_mps, tmp_path, capsys):
    if not EMULATED:
        pytest.skip("on a Mac --time measures the real shapes (a benchmark, not a test)")
    code = cli.main(["doctor", "--checks", "timing", "--time", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr()
    rows = json.loads((tmp_path / "report.json").read_text())["timing"]
    assert rows and all(row["status"].startswith("code path exercised (emulated") for row in rows), rows
    assert all(row["ours_ms"] > 0 and row["sdpa_ms"] > 0 and row["speedup"] is None for row in rows)


@pytest.mark.slow
def test_fast_math_runs_the_other_mode_in_a_fresh_python(emulator_if_no_mps, tmp_path, capsys):
    """--fast-math: the fast-math pass (PYTORCH_MPS_FAST_MATH=1, which torch reads once per process) runs
    in a child Python and its rows join the report, each saying which mode it ran in."""
    code = cli.main(["doctor", "--quick", "--fast-math", "--checks", "correctness", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["modes"] == ["safe", "fast-math"]
    modes = [row["mode"] for row in report["correctness"]]
    assert modes == ["safe"] * len(correctness.CHECKS) + ["fast-math"] * len(correctness.CHECKS)
    assert "| fast-math | passed |" in (tmp_path / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# Timing rows and table with the timers stubbed (the real figures need a Mac with mps and mlx).


@pytest.fixture
def stubbed_timers(monkeypatch):
    """No kernel runs: _calls hands back named stand-ins and median_ms returns a figure per caller."""
    from mfa_hf.doctor import mlx_timing, timing

    figures = {"ours": 2.0, "sdpa": 3.0, "mlx": 4.0}
    monkeypatch.setattr(timing, "_calls", lambda shape, device: ("ours", "sdpa", ("q", "k", "v", shape.causal)))
    monkeypatch.setattr(timing, "median_ms", lambda call, device, runs: figures[call])
    monkeypatch.setattr(mlx_timing, "mlx_call", lambda q, k, v, causal, backward=False: "mlx")
    return timing, mlx_timing


def _timing_report(rows):
    from mfa_hf.doctor import report

    summary = report.summarize([], [], rows)
    return summary, "\n".join(report._timing({"timing": rows, "summary": summary}))


def test_timing_rows_time_sdpa_and_mlx_on_every_shape(stubbed_timers):
    timing, _ = stubbed_timers
    rows = [timing.time_shape(shape, "mps", emulated=False, runs=5, mlx_reason=None) for shape in timing.SHAPES]
    for row in rows:
        assert row["status"] == "measured" and row["runs"] == 5, row
        assert (row["ours_ms"], row["sdpa_ms"], row["mlx_ms"]) == (2.0, 3.0, 4.0)
        assert (row["speedup"], row["mlx_speedup"], row["mlx_detail"]) == (1.5, 2.0, "measured")
    summary, table = _timing_report(rows)
    assert summary["timing"] == {"total": len(rows), "measured": len(rows), "failed": 0} and summary["passed"]
    assert "| MLX ms | MLX / ours |" in table
    assert table.count("| 2 | 3 | 1.5 | 4 | 2 | measured |") == len(rows), table
    assert "MLX not timed" not in table


def test_mlx_failure_is_reported_without_failing_our_row(stubbed_timers, monkeypatch):
    timing, mlx_timing = stubbed_timers

    def broken(q, k, v, causal, backward=False):
        raise RuntimeError("no such kernel\nsecond line")

    monkeypatch.setattr(mlx_timing, "mlx_call", broken)
    row = timing.time_shape(timing.SHAPES[0], "mps", emulated=False, runs=3, mlx_reason=None)
    assert row["status"] == "measured" and row["speedup"] == 1.5 and row["mlx_ms"] is None
    assert row["mlx_detail"].startswith("MLX failed: RuntimeError: no such kernel")
    row2 = timing.time_shape(timing.SHAPES[1], "mps", emulated=False, runs=3, mlx_reason=None)
    row2["mlx_detail"] = "measured"
    summary, table = _timing_report([row, row2])
    assert summary["passed"] and "measured; MLX failed: RuntimeError: no such kernel |" in table, table


def test_mlx_unavailable_is_said_once_with_its_reason(stubbed_timers, monkeypatch):
    timing, mlx_timing = stubbed_timers
    monkeypatch.setattr(mlx_timing, "mlx_call", lambda *a: pytest.fail("MLX timed although unavailable"))
    reason = "MLX not timed: mlx is not importable (ModuleNotFoundError: No module named 'mlx'); pip install mlx"
    monkeypatch.setattr(mlx_timing, "unavailable_reason", lambda emulated: reason)
    rows = timing.run_timing("mps", emulated=False, runs=3)
    assert all(row["mlx_ms"] is None and row["mlx_detail"] == reason and row["speedup"] == 1.5 for row in rows)
    _, table = _timing_report(rows)
    assert table.count(reason) == 1 and table.count("| 2 | 3 | 1.5 | - | - | measured |") == len(rows), table


def test_mlx_reasons_here():
    """Off a Mac (and always under the emulator) the reason names what is missing; on an Apple silicon Mac
    without mlx it says how to install it."""
    import platform
    import sys

    from mfa_hf.doctor import mlx_timing, timing

    assert "emulated" in mlx_timing.unavailable_reason(emulated=True)
    reason = mlx_timing.unavailable_reason(emulated=False)
    if sys.platform != "darwin" or platform.machine() != "arm64":
        assert reason.startswith("MLX not timed: MLX runs on Apple silicon Macs only"), reason
    elif reason is not None:
        assert "pip install mlx" in reason
    for row in timing.not_measured_rows():
        assert row["mlx_ms"] is None and "emulated" in row["mlx_detail"]


@pytest.mark.parametrize("argv,expected", [
    (["--runs", "0"], "--runs: expected an integer >= 1"),
    (["--checks", "compile,speed"], "--checks: expected a comma-separated subset"),
    (["--time", "--no-time"], "not allowed with argument --time"),
])
def test_usage_errors_exit_2(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["doctor", *argv])
    assert exit.value.code == 2
    assert expected in capsys.readouterr().err


def test_out_must_be_a_directory(tmp_path, capsys):
    afile = tmp_path / "file"
    afile.write_text("")
    assert cli.main(["doctor", "--out", str(afile)]) == 2
    assert "--out" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The enumeration (no compiling).


def _variant_classes():
    import importlib

    return {f.name: getattr(importlib.import_module(f.module), f.variant_class) for f in variants.FAMILIES}


@pytest.fixture
def served_on_cpu(monkeypatch):
    """The metal backend serves CPU tensors (the emulator's device), so no variant is skipped as unserved."""
    monkeypatch.setenv("MFA_METAL_EMULATOR", "1")


def test_quick_selection_covers_every_dtype_flag_and_source(served_on_cpu):
    found = variants.enumerate_variants(quick=True, device_type="cpu")
    assert not [p.error for p in found.planned if p.error]
    classes = _variant_classes()
    for family, cls in classes.items():
        planned = [p.variant for p in found.planned if p.family == family]
        assert planned, family
        assert {v.dtype for v in planned} == set(loader.MSL_TYPES), family
        for f in dataclasses.fields(cls):
            if f.type in ("bool", bool):
                assert any(getattr(v, f.name) for v in planned), (family, f.name)
    forward = [p.variant for p in found.planned if p.family == "forward"]
    assert {v.mask_kind for v in forward} == set(loader.MASK_KINDS)
    decode = [p.variant for p in found.planned if p.family == "decode"]
    assert {v.k_format for v in decode} == {"none", "fp8_e4m3", "fp8_e5m2", "int8", "nf4"}


def test_full_selection_is_pairwise_and_deduplicated(served_on_cpu):
    found = variants.enumerate_variants(quick=False, device_type="cpu")
    assert not found.skipped and found.candidates >= len(found.planned) > 500
    forward = [p.variant for p in found.planned if p.family == "forward"]
    for dtype in loader.MSL_TYPES:
        for dims in variants.HEAD_DIMS:
            mine = [v for v in forward if v.dtype == dtype and (v.dim_qk, v.dim_v) == dims]
            assert {v.mask_kind for v in mine} == set(loader.MASK_KINDS), (dtype, dims)
            assert any(v.softcap for v in mine) and any(v.sinks for v in mine), (dtype, dims)
    flags = ("softcap", "alibi", "sinks", "varlen")
    for a in flags:
        for b in flags:
            if a < b:
                assert any(getattr(v, a) and getattr(v, b) for v in forward), (a, b)
                assert any(getattr(v, a) and not getattr(v, b) for v in forward), (a, b)
    codes = [(p.source, tuple(sorted(p.variant.defines(p.param_count).items()))) for p in found.planned]
    assert len(codes) == len(set(codes))


def test_variants_the_backend_refuses_here_are_skipped_with_its_reason(served_on_cpu, monkeypatch):
    """An emulated macOS 13 with torch 2.8 compiles MSL 3.0, which has no bfloat: supports() declines
    bfloat16, so the doctor compiles no bfloat16 variant and says why."""
    monkeypatch.setenv("MSLEMU_MACOS", "13")
    monkeypatch.setenv("MSLEMU_TORCH", "2.8")
    found = variants.enumerate_variants(quick=True, device_type="cpu")
    assert found.planned and all(p.variant.dtype != torch.bfloat16 for p in found.planned)
    assert found.skipped and all(" bf16 " in name and "bfloat16" in reason for name, reason in found.skipped)


def test_covering_respects_dependent_fields_and_covers_pairs():
    kinds = ("none", "bool", "additive")
    fields = [covering.Field("dtype", lambda row: ("a", "b", "c"), ("a", "b", "c")),
              covering.Field("mask", lambda row: kinds, kinds),
              covering.Field("mask_dtype", lambda row: ("x", "y") if row["mask"] == "additive" else (None,),
                             (None, "x", "y")),
              covering.Field("flag", lambda row: (False, True), (False, True))]
    rows = covering.covering(fields, strength=2)
    assert all((row["mask_dtype"] is None) == (row["mask"] != "additive") for row in rows)
    for dtype in "abc":
        for kind in kinds:
            assert any(r["dtype"] == dtype and r["mask"] == kind for r in rows)
        for mask_dtype in "xy":
            assert any(r["dtype"] == dtype and r["mask_dtype"] == mask_dtype for r in rows)
    single = covering.covering(fields, strength=1)
    assert len(single) == 4  # none, bool, additive x, additive y
    assert rows[0] == {"dtype": "a", "mask": "none", "mask_dtype": None, "flag": False}  # defaults first


def test_an_unknown_variant_field_is_enumerated_or_noted():
    @dataclasses.dataclass(frozen=True)
    class NewVariant:
        dtype: torch.dtype
        dim: int
        shiny: bool = False
        level: int = 3

    notes = []
    rows = variants._rows(NewVariant, True, None, notes)
    assert {row["shiny"] for row in rows} == {False, True}
    assert {row["level"] for row in rows} == {3}
    assert any("NewVariant.level" in note for note in notes)


def test_an_out_folder_that_cannot_be_made_is_a_usage_error(tmp_path, capsys):
    """--out under a path that cannot hold a folder ended in a FileNotFoundError traceback after the run."""
    from mfa_hf.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["doctor", "--quick", "--out", str(blocker / "sub")]) == 2
    assert "--out" in capsys.readouterr().err
