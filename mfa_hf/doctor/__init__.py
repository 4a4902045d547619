"""`mfa-hf doctor`: the Mac self-test, one command whose report goes with a bug report.

1. compiles every Metal kernel variant the dispatcher can pick (variants.py, compile_check.py);
2. runs the metal backend against the float64 reference (correctness.py);
3. times ours against torch's own mps SDPA and MLX's when installed (timing.py, mlx_timing.py; not on the
   emulator);
4. writes report.json and report.md (report.py), prints the markdown path and a one-line verdict.

Exit code 0 when every check passed, 1 when any failed (or nothing could run), 2 on usage errors.
Without an mps device it runs the kernels through the MSL emulator (environment.py) and says so.
With --fast-math the other math mode runs in a fresh Python (torch reads PYTORCH_MPS_FAST_MATH once
per process, and the loader's library cache is per process), and its rows join the same report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .environment import (EMULATOR_ENV, FAST_MATH_ENV, Runtime, RuntimeUnavailable, choose_runtime, facts,
                          fast_math_on, mode_name)
from .report import SCHEMA, summarize, write

CHECK_NAMES = ("compile", "correctness", "timing")
DEFAULT_RUNS = 20
QUICK_SELECTION = ("quick: every dtype, every value of every variant field and every source file at least once, "
                   "head dims {dims}")
FULL_SELECTION = ("full: every dtype x head-dim pair meets every value of every other field, and every two other "
                  "fields' values meet (pairwise), head dims {dims}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mfa_hf.cli_checks import positive_int

    parser.add_argument("--quick", action="store_true",
                        help="a representative subset of kernel variants (every dtype, each flag, each source file)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where report.json and report.md go (default: ./mfa-hf-doctor-<timestamp>/)")
    parser.add_argument("--fast-math", action="store_true",
                        help="also run compile and correctness in the other math mode (PYTORCH_MPS_FAST_MATH)")
    timing = parser.add_mutually_exclusive_group()
    timing.add_argument("--time", action="store_true", default=None,
                        help="time ours vs mps SDPA (the default on a Mac; under the emulator: small shapes, "
                             "to exercise the code only)")
    timing.add_argument("--no-time", action="store_false", dest="time", help="skip timing")
    parser.add_argument("--write-route-table", action="store_true",
                        help="opt-in, on a Mac: time torch's own mps attention kernels against ours per head dim, check "
                             "them against the float64 reference, and write this machine's native-route gate table")
    parser.add_argument("--runs", type=positive_int, default=DEFAULT_RUNS, help="timed runs per shape (median)")
    parser.add_argument("--checks", type=_check_list, default=CHECK_NAMES, metavar="LIST",
                        help="comma-separated subset of compile,correctness,timing (default: all)")
    parser.add_argument("--pass-json", default=None, help=argparse.SUPPRESS)  # the --fast-math child pass


def _check_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in CHECK_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(CHECK_NAMES)}, got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    """`python -m mfa_hf.doctor` (the same as `mfa-hf doctor`)."""
    from mfa_hf.cli import main as cli_main

    return cli_main(["doctor", *(sys.argv[1:] if argv is None else argv)])


def run(args: argparse.Namespace) -> int:
    saved = {name: os.environ.get(name) for name in (EMULATOR_ENV, "MFA_BACKEND")}
    try:
        if args.pass_json:
            return _child_pass(args)
        return _run(args)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run(args) -> int:
    if args.time is False and tuple(args.checks) == ("timing",):
        print("mfa-hf doctor: error: --no-time with --checks timing: nothing left to check", file=sys.stderr)
        return 2
    if args.write_route_table:
        from .route_table import NOT_A_MAC, can_write_here

        if not can_write_here():  # a usage error, said before the checks run (minutes), not after them
            print(f"mfa-hf doctor: error: {NOT_A_MAC}", file=sys.stderr)
            return 2
    folder = _out_folder(args.out)
    started = datetime.datetime.now()
    report = {"schema": SCHEMA, "created": started.isoformat(timespec="seconds"), "command": _command(args),
              "options": {"quick": args.quick, "fast_math": args.fast_math, "time": args.time, "runs": args.runs,
                          "checks": list(args.checks)},
              "environment": {}, "modes": [], "selection": "", "notes": [], "skipped": [],
              "compile": [], "correctness": [], "timing": []}
    fatal = None
    try:
        runtime = choose_runtime()
    except RuntimeUnavailable as error:
        runtime, fatal = None, str(error)
        print(f"mfa-hf doctor: {error}", file=sys.stderr)
    report["environment"] = facts(runtime or Runtime("none", True, "no Metal runtime"))
    if runtime is not None:
        _progress(runtime.note)
        first = run_pass(args, runtime)
        passes = [first]
        if args.fast_math and {"compile", "correctness"} & set(args.checks):
            passes.append(_other_mode_pass(args, runtime, not fast_math_on()))
        for done in passes:
            report["modes"].append(done["mode"])
            report["compile"] += done["compile"]
            report["correctness"] += done["correctness"]
            report["notes"] += [n for n in done["notes"] if n not in report["notes"]]
            fatal = fatal or done.get("fatal")
        report["selection"], report["skipped"] = first["selection"], first["skipped"]
        report["timing"] = _timing(args, runtime)
    if args.write_route_table:
        from .route_table import write_for_this_mac

        try:
            report["notes"].append(f"native route table written: {write_for_this_mac(args.runs, _progress)}")
        except RuntimeError as error:
            print(f"mfa-hf doctor: {error}", file=sys.stderr)
            fatal = fatal or str(error)
    report["seconds"] = round((datetime.datetime.now() - started).total_seconds(), 1)
    report["summary"] = summarize(report["compile"], report["correctness"], report["timing"], fatal)
    _, markdown_path = write(report, folder)
    print(f"report: {markdown_path}")
    print(report["summary"]["verdict"])
    return 0 if report["summary"]["passed"] else 1


def run_pass(args, runtime: Runtime) -> dict:
    """Compile and correctness in this process, in the math mode of its environment."""
    import torch

    from .compile_check import check_compiles
    from .correctness import run_matrix
    from .variants import HEAD_DIMS, QUICK_HEAD_DIMS, enumerate_variants

    mode = mode_name(fast_math_on())
    done = {"mode": mode, "compile": [], "correctness": [], "notes": [], "skipped": [], "selection": ""}
    dims = QUICK_HEAD_DIMS if args.quick else HEAD_DIMS
    shown = ", ".join(f"{a}" if a == b else f"{a}/{b}" for a, b in dims)
    done["selection"] = (QUICK_SELECTION if args.quick else FULL_SELECTION).format(dims=shown)
    if "compile" in args.checks:
        found = enumerate_variants(args.quick, runtime.device)
        done["notes"] = found.notes
        done["skipped"] = found.skipped
        done["selection"] += (f"; {found.candidates} variants, {len(found.planned)} distinct after merging those "
                              "with identical code")
        done["compile"] = check_compiles(found.planned, torch.device(runtime.device), mode, _progress)
    if "correctness" in args.checks:
        done["correctness"] = run_matrix(runtime.device, mode, progress=_progress)
    return done


def _timing(args, runtime: Runtime) -> list[dict]:
    from .timing import not_measured_rows, run_timing

    if "timing" not in args.checks or args.time is False:
        return []
    if runtime.emulated and not args.time:
        return not_measured_rows()
    return run_timing(runtime.device, runtime.emulated, 3 if runtime.emulated else args.runs, _progress)


def _other_mode_pass(args, runtime: Runtime, fast_math: bool) -> dict:
    """The pass in the other math mode, in a fresh Python (torch reads the variable once per process)."""
    mode = mode_name(fast_math)
    _progress(f"running the {mode} pass in a fresh Python ({FAST_MATH_ENV}={'1' if fast_math else 'unset'})")
    env = dict(os.environ, PYTHONSAFEPATH="1")
    env.pop(FAST_MATH_ENV, None)
    if fast_math:
        env[FAST_MATH_ENV] = "1"
    if runtime.emulated:
        env[EMULATOR_ENV] = "1"
    with tempfile.TemporaryDirectory(prefix="mfa-hf-doctor-") as tmp:
        path = Path(tmp) / "pass.json"
        argv = [sys.executable, "-m", "mfa_hf.doctor", "--pass-json", str(path), "--checks",
                ",".join(c for c in args.checks if c != "timing")]
        if args.quick:
            argv.append("--quick")
        with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
            for line in child.stdout:  # its progress, shown as it comes
                print(line, end="", file=sys.stderr, flush=True)
        if child.returncode != 0 or not path.exists():
            return {"mode": mode, "compile": [], "correctness": [], "notes": [],
                    "fatal": f"the {mode} pass exited with code {child.returncode} (its output is above)"}
        return json.loads(path.read_text())


def _child_pass(args) -> int:
    runtime = choose_runtime()
    done = run_pass(args, runtime)
    Path(args.pass_json).write_text(json.dumps(done, default=str))
    return 0


def _out_folder(out: str | None) -> Path:
    from mfa_hf.cli_checks import UsageError

    if out is None:
        return Path.cwd() / f"mfa-hf-doctor-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {out}: expected a directory, got a file")
    try:  # made now: a folder that cannot be made is a usage error, not a traceback after the run
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {out}: cannot create the directory ({error.strerror or error})") from None
    return folder


def _command(args) -> str:
    parts = ["mfa-hf", "doctor"]
    if args.quick:
        parts.append("--quick")
    if args.fast_math:
        parts.append("--fast-math")
    if args.time is not None:
        parts.append("--time" if args.time else "--no-time")
    if args.runs != DEFAULT_RUNS:
        parts += ["--runs", str(args.runs)]
    if tuple(args.checks) != CHECK_NAMES:
        parts += ["--checks", ",".join(args.checks)]
    if args.out:
        parts += ["--out", args.out]
    return " ".join(parts)


def _progress(line: str) -> None:
    print(f"mfa-hf doctor: {line}", file=sys.stderr, flush=True)
