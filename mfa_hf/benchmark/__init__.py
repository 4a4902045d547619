"""Benchmarks: `python -m mfa_hf.benchmark --suite quick|full|...` (the CLI, __main__.py) and, from Python,
`from mfa_hf.benchmark import run_suite, compare_vs_sdpa` (programmatic.py, mps-flash-attn's names).

The programmatic names load on first use: `python -m mfa_hf.benchmark.worker` must not find its own
module imported by the package first."""

_PROGRAMMATIC = ("run_suite", "compare_vs_sdpa")


def __getattr__(name: str):
    if name in _PROGRAMMATIC:
        from . import programmatic

        return getattr(programmatic, name)
    raise AttributeError(f"module 'mfa_hf.benchmark' has no attribute {name!r}")


__all__ = list(_PROGRAMMATIC)
