"""Benchmarks: `python -m mfa_hf.benchmark --suite quick|full|...` (the CLI, __main__.py) and, from Python,
`from mfa_hf.benchmark import run_suite, compare_vs_sdpa, generate_report` (programmatic.py,
run_suite_report.py: mps-flash-attn's names).

The programmatic names load on first use: `python -m mfa_hf.benchmark.worker` must not find its own
module imported by the package first."""

_PROGRAMMATIC = {"run_suite": "programmatic", "compare_vs_sdpa": "programmatic", "generate_report": "run_suite_report"}


def __getattr__(name: str):
    if name in _PROGRAMMATIC:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_PROGRAMMATIC[name]}"), name)
    raise AttributeError(f"module 'mfa_hf.benchmark' has no attribute {name!r}")


__all__ = list(_PROGRAMMATIC)
