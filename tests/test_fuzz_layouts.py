"""Every tensor argument in unusual layouts and dtypes, on every backend, against the float64 reference
(issue 16; the helpers and the case catalog live in mfa_hf/testing_layouts/).

Each case lays out q, k, v, attn_mask (bool and additive, any broadcast shape), alibi_slopes ((Hq,) and
(B, Hq)), sinks, cu_seqlens_q/k, the KV cache, the new k/v, cache_seqlens, cache_batch_idx, grad_out and
the LSE's gradient transposed, sliced, offset or expanded (stride 0) inside a garbage-filled buffer, in
the dtypes the API accepts (int32/int64 indices; float16/bfloat16/float32/float64 helpers and masks),
then compares out, LSE and every gradient with the reference (mfa_hf/testing.py's rule), checks that no
input buffer changed and that a KV cache holds exactly the appended tokens.

Backends: torch (in this process), metal (the MSL emulator on Linux, mps on a Mac) and triton (its
interpreter on CPU; MFA_TRITON_FULL=1 on CUDA). metal and triton run in a worker process per backend
(mfa_hf.testing_layouts.IsolatedRunner): the worker gets TRITON_INTERPRET / MFA_METAL_EMULATOR before it
imports mfa_hf, and a kernel that aborts the process fails that case instead of pytest.

    python -m pytest tests/test_fuzz_layouts.py -q                 # default: every backend
    python -m pytest tests/test_fuzz_layouts.py -q -k metal        # one backend
    python -m pytest tests/test_fuzz_layouts.py -q --run-slow      # full products, longer fuzz
    MFA_FUZZ_SHRINK=1 python -m pytest tests/test_fuzz_layouts.py -k "every_argument and metal"  # shrink

Each failure prints the spec and a one-line command that reproduces it in a fresh process. The tests
stop at a backend's first fuzz failure; to list every failing example of many:

    python -m mfa_hf.testing_layouts explore metal dense 200 [SEED]   # backends: torch metal triton
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, reject, settings

from mfa_hf.kernels.torch import tiles
from mfa_hf.testing_layouts import (
    STRATEGIES,
    IsolatedRunner,
    SpecNotApplicable,
    describe,
    repro_command,
    run_spec,
    targeted_cases,
)

BACKENDS = ("torch", "metal", "triton")
SLOW_BACKENDS = ("triton",)  # only its core cases by default: the interpreter takes ~1 s a case
# Hypothesis examples per (dense, varlen, kvcache) test: default, and with --run-slow.
EXAMPLES = {"torch": (25, 15, 15), "metal": (25, 15, 15), "triton": (5, 3, 3)}
SLOW_EXAMPLES = {"torch": (400, 200, 200), "metal": (400, 200, 200), "triton": (60, 30, 30)}
SMALL_TILES = tiles.Tiling(score_block_elements=64, key_tile=8, min_query_tile=4, max_query_tile=8)


@pytest.fixture(scope="session")
def isolated():
    """One worker process per backend for the session (restarted after a crash)."""
    runners = {}

    def get(backend: str) -> IsolatedRunner:
        if backend not in runners:
            runners[backend] = IsolatedRunner(backend)
        return runners[backend]

    yield get
    for runner in runners.values():
        runner.close()


@pytest.fixture
def runner(request, isolated, monkeypatch):
    """runner(backend) -> a function spec -> failures, for that backend."""

    def get(backend: str):
        if backend == "torch":
            monkeypatch.setenv("MFA_BACKEND", "torch")
            monkeypatch.setattr(tiles, "TILING", SMALL_TILES)
            return run_spec
        if backend == "metal" and not torch.backends.mps.is_available():
            from mfa_hf.kernels.metal.emulator.compiler import find_compiler

            find_compiler()  # as tests/metal: a missing clang is an error with install instructions, not a skip
        if backend == "triton":
            pytest.importorskip("triton")
            if os.environ.get("MFA_TRITON_FULL") == "1" and not torch.cuda.is_available():
                pytest.fail("MFA_TRITON_FULL=1 needs a CUDA device; none is visible")
        return isolated(backend).run

    return get


def report(backend: str, spec, failures: list[str]) -> str:
    lines = [f"{backend}: {describe(spec)}"] + [f"  - {failure}" for failure in failures]
    lines.append(f"reproduce: {repro_command(spec, backend)}")
    return "\n".join(lines)


def _target_params():
    params = []
    for target in targeted_cases():
        for backend in target.backends:
            slow = target.slow or (backend in SLOW_BACKENDS and not target.core)
            params.append(pytest.param(backend, target.spec, id=f"{backend}-{target.id}",
                                       marks=(pytest.mark.slow,) if slow else ()))
    return params


@pytest.mark.parametrize("backend, spec", _target_params())
def test_argument_layout(backend, spec, runner):
    """One argument (or one semantic rule) at a time: the id names the argument, its layout and dtype."""
    try:
        failures = runner(backend)(spec)
    except SpecNotApplicable as reason:
        pytest.skip(str(reason))
    if failures:
        pytest.fail(report(backend, spec, failures), pytrace=False)


def _fuzz(backend: str, kind: str, examples: int, run) -> None:
    phases = [Phase.explicit, Phase.generate]
    if os.environ.get("MFA_FUZZ_SHRINK") == "1":
        phases.append(Phase.shrink)  # off by default: shrinking a crashing case restarts a worker per step

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, phases=phases,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(spec=STRATEGIES[kind](backend))
    def every_argument_at_once(spec):
        try:
            failures = run(spec)
        except SpecNotApplicable:
            reject()
        if failures:
            raise AssertionError(report(backend, spec, failures))

    every_argument_at_once()


@pytest.mark.parametrize("kind", tuple(STRATEGIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_every_argument(backend, kind, runner):
    """Random shapes, flags, and a random layout and dtype for every tensor argument at once."""
    _fuzz(backend, kind, EXAMPLES[backend][tuple(STRATEGIES).index(kind)], runner(backend))


@pytest.mark.slow
@pytest.mark.parametrize("kind", tuple(STRATEGIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_every_argument_long(backend, kind, runner):
    _fuzz(backend, kind, SLOW_EXAMPLES[backend][tuple(STRATEGIES).index(kind)], runner(backend))
