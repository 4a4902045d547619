"""Exploring: run many examples and keep every failure (the tests stop at the first)."""

from __future__ import annotations

import sys

from .isolation import IsolatedRunner
from .layouts import SpecNotApplicable
from .specs import describe
from .strategies import STRATEGIES



def explore(backend: str, kind: str, examples: int, seed: int | None = None) -> list[tuple]:
    """[(spec, failures)] over `examples` hypothesis examples of `kind`, run in a worker for `backend`."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fix_seed

    runner = IsolatedRunner(backend)
    found = []

    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=seed is None)
    @given(spec=STRATEGIES[kind](backend))
    def collect(spec):
        try:
            failures = runner.run(spec)
        except SpecNotApplicable:
            return
        if failures:
            found.append((spec, failures))

    if seed is not None:
        collect = fix_seed(seed)(collect)
    try:
        collect()
    finally:
        runner.close()
    return found


def main(argv: list[str] | None = None) -> int:
    """python -m mfa_hf.testing_layouts explore BACKEND KIND [EXAMPLES] [SEED]: print every failing example."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] != "explore":
        print(main.__doc__)
        return 2
    backend, kind = args[1], args[2]
    examples = int(args[3]) if len(args) > 3 else 100
    seed = int(args[4]) if len(args) > 4 else None
    found = explore(backend, kind, examples, seed)
    for spec, failures in found:
        print(f"{backend}: {describe(spec)}")
        for failure in failures:
            print(f"  - {failure}")
    print(f"{len(found)} of {examples} examples failed")
    return 1 if found else 0
