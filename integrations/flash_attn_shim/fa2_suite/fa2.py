"""Run FlashAttention-2's own tests/test_flash_attn.py against mfa-hf's flash_attn shim.

    python integrations/flash_attn_shim/fa2_suite/fa2.py prepare [--ref v2.8.3] [--repo GITDIR]
    python integrations/flash_attn_shim/fa2_suite/fa2.py collect [--ref v2.8.3]
    python integrations/flash_attn_shim/fa2_suite/fa2.py run [--ref v2.8.3] [--every N] [--offset K]
            [--match REGEX] [--shard I/K] [--budget SECONDS] [--report FILE] [--cpu [--smoke]] [-- PYTEST_ARGS...]
    python integrations/flash_attn_shim/fa2_suite/fa2.py merge REPORT.json... [--report MERGED.json]

(run.sh wraps these; `run.sh gpu K ...` starts K `run --shard I/K` processes on one GPU and merges.)

prepare (needs the FA2 git history or the network; run it where those are): writes the ignored
folder .fa2_tests/ at the repository root: <ref>/test_flash_attn.py exactly as FA2 ships it,
<ref>/cpu/test_flash_attn.py (the same file with only its device="cuda" literals turned into "cpu",
for a CPU smoke run), wheels/einops-*.whl (the tests import einops), pytest.ini (an empty
configuration, so the repository's own pytest settings and conftest files stay out), SOURCE.

collect: counts the parametrized cases (works on CPU: torch.cuda's capability queries, which the
module calls at import, are answered as an H100/H200 would, sm90).

run: pytest on the unmodified file with the shim installed, in this process; on a machine without
einops it is installed from .fa2_tests/wheels (pip --no-index, into .fa2_tests/site). --every N
--offset K keeps, of every test function, the cases whose parametrization index is K mod N (a
deterministic sample, taken while pytest parametrizes: building all items first takes minutes);
--match REGEX keeps the cases whose 'test_name[param-id]' it matches (also while parametrizing);
-k and other pytest arguments go after `--`. --budget stops starting new cases after that many
seconds, so a run under a wall-clock limit still prints its summary. --shard I/K runs every K-th
case of the selection from the I-th (merge combines the shards' reports). --cpu runs the cpu/ copy
(with MFA_BACKEND=torch unless set); --smoke keeps the SMOKE cases below. The summary classifies every failure by its
reason and writes a JSON report (--report, default .fa2_tests/report.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
FOLDER = REPO / ".fa2_tests"
DEFAULT_REF = "v2.8.3"  # the API level the shim claims (flash_attn.__version__ == "2.8.3+mfahf")
TEST_PATH = "tests/test_flash_attn.py"
MIRROR = Path("/work/.mirror/Dao-AILab+flash-attention/repo")
UPSTREAM = "https://github.com/Dao-AILab/flash-attention.git"
_DEVICE_LITERAL = re.compile(r"""device\s*=\s*(["'])cuda\1""")


# ---------------------------------------------------------------------------------------------
# prepare


def _git_show(repo: Path, ref: str, path: str) -> tuple[str, str]:
    text = subprocess.run(["git", "-C", str(repo), "show", f"{ref}:{path}"], check=True, capture_output=True,
                          text=True).stdout
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", f"{ref}^{{commit}}"], check=True,
                            capture_output=True, text=True).stdout.strip()
    return text, commit


def _clone(ref: str) -> Path:
    target = FOLDER / "upstream"
    if not target.exists():
        subprocess.run(["git", "clone", "--bare", "--filter=blob:none", UPSTREAM, str(target)], check=True)
    subprocess.run(["git", "-C", str(target), "fetch", "--depth", "1", "origin", f"refs/tags/{ref}:refs/tags/{ref}"],
                   check=False)
    return target


def prepare(ref: str, repo: str | None) -> int:
    source = Path(repo) if repo else Path(os.environ.get("FA2_REPO", MIRROR))
    if not source.exists():
        print(f"fa2: {source} not found; cloning {UPSTREAM}")
        source = _clone(ref)
    text, commit = _git_show(source, ref, TEST_PATH)
    folder = FOLDER / ref
    (folder / "cpu").mkdir(parents=True, exist_ok=True)
    (folder / "test_flash_attn.py").write_text(text)
    cpu_text, replaced = _DEVICE_LITERAL.subn('device="cpu"', text)
    (folder / "cpu" / "test_flash_attn.py").write_text(cpu_text)
    (FOLDER / "pytest.ini").write_text("[pytest]\n")
    (FOLDER / ".gitignore").write_text("*\n")
    wheels = FOLDER / "wheels"
    wheels.mkdir(exist_ok=True)
    if not list(wheels.glob("einops-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d",
                        str(wheels), "einops"], check=True)
    (FOLDER / "SOURCE").write_text(f"ref={ref}\ncommit={commit}\nfrom={source}\n")
    print(f"fa2: {folder / 'test_flash_attn.py'} ({len(text.splitlines())} lines, FA2 {ref} = {commit[:12]}); "
          f"cpu copy with {replaced} device literals replaced; wheels: "
          f"{', '.join(p.name for p in wheels.glob('*.whl'))}")
    return collect(ref)


# ---------------------------------------------------------------------------------------------
# environment for collection and runs


def _ensure_einops() -> None:
    try:
        import einops  # noqa: F401
        return
    except ImportError:
        pass
    site = FOLDER / "site"
    if not (site / "einops").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links",
                        str(FOLDER / "wheels"), "--target", str(site), "einops"], check=True)
    sys.path.insert(0, str(site))
    import einops  # noqa: F401


class _FakeProperties:
    name = "none (collection only)"
    total_memory = 80 * 2**30
    major, minor = 9, 0


def _fake_cuda_queries() -> None:
    """The test module asks torch.cuda for the device capability at import; answer as sm90 where
    there is no GPU (collection and the CPU smoke run only)."""
    import torch

    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    torch.cuda.get_device_properties = lambda device=None: _FakeProperties()


def _install_shim() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from mfa_hf.integrations.flash_attn_shim import install_flash_attn_shim

    if not install_flash_attn_shim():
        raise SystemExit("fa2: a real flash_attn is importable here; the run would test it, not the shim")


def _test_file(ref: str, cpu: bool) -> Path:
    path = FOLDER / ref / ("cpu" if cpu else "") / "test_flash_attn.py"
    if not path.exists():
        raise SystemExit(f"fa2: {path} is missing: run `fa2.py prepare --ref {ref}` first (where git/network is)")
    return path


def _base_args(path: Path) -> list[str]:
    # The empty ini keeps the repository's pyproject settings out; --noconftest its conftest files.
    return [str(path), "-c", str(FOLDER / "pytest.ini"), "--rootdir", str(path.parent), "--noconftest",
            "-p", "no:cacheprovider"]


# ---------------------------------------------------------------------------------------------
# collect


class _Counter:
    def __init__(self):
        self.per_function = Counter()

    def pytest_collection_modifyitems(self, items):
        for item in items:
            self.per_function[item.originalname or item.name] += 1


def collect(ref: str, cpu: bool = False) -> int:
    _ensure_einops()
    _install_shim()
    import torch

    if not torch.cuda.is_available():
        _fake_cuda_queries()
    counter = _Counter()
    code = pytest.main([*_base_args(_test_file(ref, cpu)), "--collect-only", "-qq"], plugins=[counter])
    total = sum(counter.per_function.values())
    for name, count in sorted(counter.per_function.items()):
        print(f"  {name:40s} {count:6d}")
    print(f"fa2: FA2 {ref} tests/test_flash_attn.py collects {total} cases")
    return int(code)


# ---------------------------------------------------------------------------------------------
# run: sampling, time budget, failure classification, summary


def _statement(excinfo, test_file: str) -> str:
    """The source of the innermost frame inside FA2's test file (the failing assert or call)."""
    for entry in reversed(excinfo.traceback):
        if str(entry.path) == test_file:
            try:
                return " ".join(str(entry.statement).split())
            except Exception:  # noqa: BLE001 - source unavailable
                return ""
    return ""


_ASSERT_REASONS = (  # (substring of the failing assert, reason), first match wins
    ("attn - attn_ref", "S_dmask probabilities differ (dropout introspection)"),
    ("dropout_fraction", "dropout fraction off (dropout introspection)"),
    ("k_cache_select", "KV-cache append (k_cache contents)"),
    ("v_cache_select", "KV-cache append (v_cache contents)"),
    ("isnan", "NaN in gradients"),
    ("torch.equal(out", "forward not bitwise reproducible"),
    ("torch.equal(lse", "forward LSE not bitwise reproducible"),
    ("dq_equal", "backward not reproducible"),
    ("torch.equal(d", "backward not bitwise reproducible"),
    ("out - out_ref", "forward output accuracy"),
    ("q.grad", "gradient accuracy"),
    ("k.grad", "gradient accuracy"),
    ("v.grad", "gradient accuracy"),
    ("dq", "gradient accuracy"),
    ("dk", "gradient accuracy"),
    ("dv", "gradient accuracy"),
)


def _normalized(message: str) -> str:
    line = (message.strip().splitlines() or [""])[0]
    line = re.sub(r"0x[0-9a-fA-F]+", "0x?", line)
    line = re.sub(r"\d+(\.\d+)?", "N", line)
    return line[:160]


def classify(excinfo, test_file: str) -> str:
    error = excinfo.value
    name = type(error).__name__
    message = str(error)
    if name == "OutOfMemoryError" or "out of memory" in message.lower():
        return "out of memory"
    if isinstance(error, AssertionError):
        statement = _statement(excinfo, test_file)
        for needle, reason in _ASSERT_REASONS:
            if needle in statement:
                return reason
        return f"assertion: {statement[:120]}"
    if isinstance(error, NotImplementedError):
        return f"refused by the shim: {_normalized(message)}"
    lowered = message.lower()
    if "head dim" in lowered or "head_dim" in lowered or "headdim" in lowered:
        return f"unsupported head dim: {_normalized(message)}"
    return f"{name}: {_normalized(message)}"


_SKIPPED = pytest.skip.Exception


class FA2Suite:
    """pytest plugin: deterministic sampling and sharding, a time budget, and a classified summary."""

    def __init__(self, test_file: Path, every: int, offset: int, shard: tuple[int, int], budget: float | None,
                 report: Path, label: str, match: str | None = None):
        self.test_file = str(test_file)
        self.match = re.compile(match) if match else None
        self.every, self.offset, self.shard, self.budget = every, offset, shard, budget
        self.report_path, self.label = report, label
        self.collected = self.selected = 0
        self.start = time.monotonic()
        self.outcomes: dict[str, list] = {}  # case id -> [outcome, reason, seconds]
        self.reasons: dict[str, str] = {}
        self.stopped_by_budget = False
        self.session = None

    def pytest_sessionstart(self, session):
        self.session = session

    @pytest.hookimpl(trylast=True)
    def pytest_generate_tests(self, metafunc):
        """Sample while parametrizing (after pytest expanded the marks): building all ~500,000 items
        first takes minutes. Keeps call index K mod N of every test function, then this shard's share."""
        calls = getattr(metafunc, "_calls", None)
        if calls is None:
            return
        self.collected += max(len(calls), 1)
        if self.every > 1:
            calls = calls[self.offset % self.every :: self.every]
        if self.match is not None:
            name = metafunc.function.__name__
            calls = [call for call in calls if self.match.search(f"{name}[{call.id}]")]
        index, count = self.shard
        metafunc._calls = calls[index::count]

    def pytest_collection_modifyitems(self, config, items):
        # A test function whose every case was sampled away still yields one item, without
        # parameters (pytest's placeholder for an empty parametrization): drop it.
        empty = [item for item in items if not hasattr(item, "callspec")]
        if empty:
            config.hook.pytest_deselected(items=empty)
            items[:] = [item for item in items if hasattr(item, "callspec")]

    def pytest_collection_finish(self, session):
        self.selected = len(session.items)
        self.start = time.monotonic()

    def pytest_runtest_makereport(self, item, call):
        if call.excinfo is not None and not call.excinfo.errisinstance(_SKIPPED):
            self.reasons.setdefault(item.nodeid, classify(call.excinfo, self.test_file))

    def pytest_runtest_logreport(self, report):
        case = report.nodeid.split("::")[-1]
        entry = self.outcomes.setdefault(case, ["passed", "", 0.0])
        entry[2] = round(entry[2] + report.duration, 3)
        if report.skipped:
            where, reason = "", str(report.longrepr)
            if isinstance(report.longrepr, tuple):
                where, reason = self._skip_condition(report.longrepr[1]), report.longrepr[2]
            reason = reason.replace("Skipped: ", "")
            entry[:2] = ["skipped", f"skipped by FA2's test{where}" + ("" if reason == "Skipped" else f": {reason}")]
        elif report.failed and entry[0] != "failed":
            entry[:2] = ["failed" if report.when == "call" else "error",
                         self.reasons.get(report.nodeid, f"{report.when} failed")]

    def _skip_condition(self, line: int) -> str:
        """' (line N, if <condition>)' for a pytest.skip() call at 1-based line N under an if."""
        if not hasattr(self, "_lines"):
            self._lines = Path(self.test_file).read_text().splitlines()
        above = self._lines[line - 2].strip() if 2 <= line <= len(self._lines) + 1 else ""
        return f" (line {line}, {above.rstrip(':')})" if above.startswith("if ") else f" (line {line})"

    def pytest_runtest_logfinish(self, nodeid, location):
        if self.budget is not None and time.monotonic() - self.start > self.budget and self.session is not None:
            self.stopped_by_budget = True
            self.session.shouldstop = f"fa2: time budget of {self.budget:.0f} s spent"

    def pytest_terminal_summary(self, terminalreporter):
        sample = (f"every {self.every}th case of each test function from index {self.offset % self.every}"
                  if self.every > 1 else "every case")
        if self.match:
            sample += f", matching {self.match.pattern[:60]!r}..."
        if self.shard[1] > 1:
            sample += f", shard {self.shard[0]} of {self.shard[1]}"
        data = {"label": self.label, "sample": sample, "collected": self.collected, "selected": self.selected,
                "seconds": round(time.monotonic() - self.start, 1), "stopped_by_budget": self.stopped_by_budget,
                "outcomes": self.outcomes}
        self.report_path.parent.mkdir(parents=True, exist_ok=True)
        self.report_path.write_text(json.dumps(data, indent=0))
        for line in summary_lines(data):
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"report: {self.report_path}")


def summary_lines(data: dict) -> list[str]:
    """The summary of one report (or of merged ones): counts, pass rate, per function, reasons."""
    outcomes = data["outcomes"]
    counts = Counter(o for o, _, _ in outcomes.values())
    runnable = counts["passed"] + counts["failed"] + counts["error"]
    failures = Counter(r for o, r, _ in outcomes.values() if o in ("failed", "error"))
    skips = Counter(r for o, r, _ in outcomes.values() if o == "skipped")
    examples = defaultdict(list)
    per_function: dict[str, Counter] = defaultdict(Counter)
    for case, (outcome, reason, _) in sorted(outcomes.items()):
        per_function[case.split("[")[0]][outcome] += 1
        if outcome in ("failed", "error") and len(examples[reason]) < 3:
            examples[reason].append(case)
    not_run = data["selected"] - len(outcomes)
    lines = ["", f"===== FA2 suite: {data['label']} =====",
             f"collected {data['collected']}, selected {data['selected']} ({data['sample']}), ran {len(outcomes)} in "
             f"{data['seconds']} s" + (f"; {not_run} selected but not run"
                                      + (" (time budget)" if data["stopped_by_budget"] else "") if not_run else ""),
             f"passed {counts['passed']} | failed {counts['failed']} | errors {counts['error']} | "
             f"skipped by FA2's own conditions {counts['skipped']}"]
    if runnable:
        lines.append(f"pass rate of runnable cases: {100.0 * counts['passed'] / runnable:.1f}% "
                     f"({counts['passed']} / {runnable})")
    lines.append(f"  {'test function':40s} {'passed':>7s} {'failed':>7s} {'skipped':>7s}")
    for name, c in sorted(per_function.items()):
        lines.append(f"  {name:40s} {c['passed']:7d} {c['failed'] + c['error']:7d} {c['skipped']:7d}")
    if failures:
        lines.append("failures by reason:")
        for reason, count in failures.most_common():
            lines.append(f"  {count:6d}  {reason}")
            lines.append(f"          e.g. {', '.join(examples[reason])}")
    if skips:
        lines.append("skips by reason (FA2's own conditions):")
        for reason, count in skips.most_common():
            lines.append(f"  {count:6d}  {reason}")
    return lines


def merge(paths: list[str], out: str | None = None) -> int:
    """One summary over several shard reports (fa2.py run --shard I/K --report ...); --report writes
    the merged report."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    if not reports:
        raise SystemExit("fa2: merge needs report files")
    data = {"label": reports[0]["label"], "sample": reports[0]["sample"].split(", shard")[0] + f", {len(reports)} shards",
            "collected": reports[0]["collected"], "selected": sum(r["selected"] for r in reports),
            "seconds": max(r["seconds"] for r in reports),
            "stopped_by_budget": any(r["stopped_by_budget"] for r in reports),
            "outcomes": {k: v for r in reports for k, v in r["outcomes"].items()}}
    print("\n".join(summary_lines(data)))
    if out:
        Path(out).write_text(json.dumps(data, indent=0))
        print(f"report: {out}")
    return 0


def run(ref: str, every: int, offset: int, budget: float | None, report: str | None, cpu: bool,
        extra: list[str], match: str | None = None, shard: tuple[int, int] = (0, 1)) -> int:
    if cpu:
        os.environ.setdefault("MFA_BACKEND", "torch")
    _ensure_einops()
    _install_shim()
    import torch

    if not torch.cuda.is_available():
        if not cpu:
            raise SystemExit("fa2: no CUDA device; FA2's tests allocate on cuda (use --cpu for the smoke copy)")
        _fake_cuda_queries()
    path = _test_file(ref, cpu)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not cpu else "cpu"
    label = (f"FA2 {ref} tests/test_flash_attn.py{' (cpu copy)' if cpu else ''} on {device}, "
             f"MFA_BACKEND={os.environ.get('MFA_BACKEND', 'auto')}, torch {torch.__version__}")
    report_path = Path(report) if report else FOLDER / "report.json"
    plugin = FA2Suite(path, max(every, 1), offset, shard, budget, report_path, label, match)
    code = pytest.main([*_base_args(path), "-q", "--tb=no", "-rN", "-p", "no:warnings", *extra], plugins=[plugin])
    return 0 if code in (0, 1) else int(code)  # 1 = some cases failed: the summary says which and why


# A CPU smoke set: small shapes, one or two head dims, every test function and feature (dropout with
# S_dmask, windows as tensors, ALiBi, softcap, GQA/MQA, packed forms, varlen, paged KV, rotary,
# cache_leftpad). The repetition tests (race_condition: 250 runs of a batch of 60, deterministic: 50
# backward passes) are left to the GPU: minutes each on a CPU. Ids are FA2 2.6.3's parameter orders.
SMOKE = "|".join([
    r"test_flash_attn_qkvpacked\[0\.17-97-59-(True|False)-True-False-False-dtype0\]",
    r"test_flash_attn_varlen_qkvpacked\[0\.17-97-59-(True|False)-True-False-False-dtype0\]",
    r"test_flash_attn_output\[0\.0-0\.17-113-203-59-(True|False)-(True|False)-False-False-gqa-dtype1-False\]",
    r"test_flash_attn_output\[50\.0-0\.0-113-203-59-True-False-True-False-mqa-dtype0-True\]",
    r"test_flash_attn_varlen_output\[0\.0-(0\.0|0\.17)-113-203-59-(True|False)-True-(True|False)-False-gqa-dtype0-True\]",
    r"test_flash_attn_varlen_output\[50\.0-0\.0-113-203-59-True-True-True-False-mha-dtype1-False\]",
    r"test_flash_attn_causal\[113-203-(True|False)-59-True-dtype0\]",
    r"test_flash_attn_varlen_causal\[(None|256)-113-203-(True|False)-59-True-dtype1\]",
    r"test_flash_attn_splitkv\[64-800-(True|False)-59-(True|False)-True-True-False-dtype0\]",
    r"test_flash_attn_kvcache\[3-799-64-False-(True|False)-(None|256)-0\.5-(True|False)-False-(True|False)-True-True-True-gqa-0-dtype0\]",
    r"test_flash_attn_kvcache\[64-256-59-False-False-None-1\.0-True-False-False-False-False-True-mha-1-dtype0\]",
    r"test_flash_attn_bwd_(overflow|varlen_overflow|transpose)\[.*\b(16|64)-True-dtype0\]",
])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--ref", default=DEFAULT_REF)
    p.add_argument("--repo", default=None, help="a git dir holding FA2's history (default $FA2_REPO or the mirror)")
    c = sub.add_parser("collect")
    c.add_argument("--ref", default=DEFAULT_REF)
    c.add_argument("--cpu", action="store_true")
    r = sub.add_parser("run")
    r.add_argument("--ref", default=DEFAULT_REF)
    r.add_argument("--every", type=int, default=1)
    r.add_argument("--offset", type=int, default=0)
    r.add_argument("--budget", type=float, default=None, help="seconds after which no new case starts")
    r.add_argument("--report", default=None)
    r.add_argument("--shard", default="0/1", help="I/K: run the I-th of K interleaved parts of the selection "
                   "(run K processes side by side, then `fa2.py merge` their reports)")
    r.add_argument("--match", default=None, help="regex searched in 'test_name[param-id]', applied while "
                   "parametrizing (fast, unlike -k, which needs every item built first)")
    r.add_argument("--cpu", action="store_true", help="the cpu/ copy, MFA_BACKEND=torch unless set")
    r.add_argument("--smoke", action="store_true", help="only the SMOKE cases (with --cpu: the CPU smoke run)")
    m = sub.add_parser("merge")
    m.add_argument("reports", nargs="+")
    m.add_argument("--report", default=None, help="write the merged report here")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.command == "prepare":
        return prepare(args.ref, args.repo)
    if args.command == "collect":
        return collect(args.ref, args.cpu)
    if args.command == "merge":
        return merge(args.reports, args.report)
    index, count = (int(x) for x in args.shard.split("/"))
    if not 0 <= index < count:
        raise SystemExit(f"fa2: --shard: expected I/K with 0 <= I < K, got {args.shard}")
    match = args.match
    if args.smoke:
        match = SMOKE if match is None else f"(?=.*(?:{SMOKE}))(?:{match})"
    return run(args.ref, args.every, args.offset, args.budget, args.report, args.cpu, extra, match, (index, count))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
