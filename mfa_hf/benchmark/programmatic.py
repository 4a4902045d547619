"""The benchmark from Python, with mps-flash-attn's names:

    from mfa_hf.benchmark import run_suite, compare_vs_sdpa
    rows = run_suite(seq_lengths=[1024, 2048, 4096])   # a pandas DataFrame when pandas is importable
    summary = compare_vs_sdpa()                         # prints the side-by-side table

Rows are measured in this process, with the CLI's worker calls (worker.attention_call: the same inputs,
and fwd / fwd+bwd passes) and timing (measure.median_ms); peak memory needs a process per row, so it is
the CLI's (`python -m mfa_hf.benchmark --suite quick`). Each row: the shape and pass, sdpa_ms, mfa_ms,
speedup = sdpa_ms / mfa_ms (above 1: ours is faster), max_diff = max |ours - SDPA| over the output, and
served_by (our backend, or the platform's fused path where routing chose it). Sliding-window rows have no
SDPA counterpart (SDPA has no window): their SDPA columns are empty, as in mps-flash-attn.
"""

from __future__ import annotations

import sys

import torch

from .measure import median_ms, ratio, timed_then_named
from .suite_quick import default_device
from .table import format_table
from .worker import attention_call

DEFAULTS = {  # device kind -> mps-flash-attn's run_suite defaults, smaller on CPU
    "gpu": dict(seq_lengths=[512, 1024, 2048, 4096, 8192], dtypes=["float16", "bfloat16"], batch_sizes=[1, 4],
                head_dims=[64, 128], num_heads_list=[8]),
    "cpu": dict(seq_lengths=[256, 512, 1024], dtypes=["float32"], batch_sizes=[1], head_dims=[64],
                num_heads_list=[8]),
}
WINDOW_MIN_SEQLEN = 1024  # window rows (a quarter of the sequence) for sequences at least this long
COLUMNS = ["batch", "heads", "seqlen", "head_dim", "dtype", "causal", "window", "pass", "sdpa_ms", "mfa_ms",
           "speedup", "max_diff", "served_by"]


def run_suite(seq_lengths=None, dtypes=None, batch_sizes=None, head_dims=None, num_heads_list=None,
              include_causal: bool = True, include_window: bool = True, include_backward: bool = False,
              verbose: bool = True, device: str | None = None, repeats: int = 5, as_frame: bool | None = None):
    """Ours (mfa_hf.flash_attention) against SDPA over every combination given; None takes the device's
    defaults (DEFAULTS). Returns the rows: a pandas DataFrame if pandas is importable (as_frame=None) or
    as_frame=True, else a list of dicts."""
    device = device or default_device()
    given = dict(seq_lengths=seq_lengths, dtypes=dtypes, batch_sizes=batch_sizes, head_dims=head_dims,
                 num_heads_list=num_heads_list)
    grid = {name: list(value) if value is not None else DEFAULTS[_kind(device)][name] for name, value in given.items()}
    _check_grid(grid, repeats)
    specs = _specs(grid, device, include_causal, include_window, include_backward, repeats)
    rows = []
    for i, spec in enumerate(specs, 1):
        row = measure_row(spec)
        if verbose:
            print(f"[{i}/{len(specs)}] {_label(row)}", file=sys.stderr, flush=True)
        rows.append(row)
    return _as_frame(rows, as_frame)


def compare_vs_sdpa(seq_lengths=None, dtype: str | None = None, verbose: bool = True, device: str | None = None,
                    repeats: int = 5) -> dict:
    """Prints ours vs SDPA side by side (B=1, H=8, D=64, not causal, forward) per sequence length and
    returns mps-flash-attn's summary: average/max/min speedup, crossover_seq_len (the first length where
    ours is faster), num_tests and the rows."""
    device = device or default_device()
    dtypes = None if dtype is None else [dtype]
    rows = run_suite(seq_lengths, dtypes, [1], [64], [8], include_causal=False, include_window=False,
                     verbose=False, device=device, repeats=repeats, as_frame=False)
    if verbose:
        print(f"# mfa_hf.flash_attention vs SDPA on {device}; torch {torch.__version__}")
        print(format_table(rows, ["seqlen", "dtype", "sdpa_ms", "mfa_ms", "speedup", "max_diff", "served_by"]))
    speedups = [row["speedup"] for row in rows]
    crossover = next((row["seqlen"] for row in rows if row["speedup"] > 1.0), None)
    return {"average_speedup": sum(speedups) / len(speedups), "max_speedup": max(speedups),
            "min_speedup": min(speedups), "crossover_seq_len": crossover, "num_tests": len(rows), "results": rows}


def measure_row(spec: dict) -> dict:
    """One row: ours (and SDPA unless the spec has a window) timed, and their outputs compared."""
    mfa = attention_call({**spec, "impl": "mfa"})
    ours, calls, routes = timed_then_named(mfa, spec["device"], spec["repeats"])
    row = {**{c: spec.get(c) for c in COLUMNS[:8]}, "mfa_ms": ours["median_ms"], "served_by": _served(calls, routes)}
    if spec.get("window") is not None:
        return {**row, "sdpa_ms": None, "speedup": None, "max_diff": None}
    sdpa = attention_call({**spec, "impl": "sdpa"})
    theirs = median_ms(sdpa, spec["device"], spec["repeats"])
    max_diff = float((mfa().detach().float() - sdpa().detach().float()).abs().max())
    return {**row, "sdpa_ms": theirs["median_ms"], "speedup": ratio(theirs["median_ms"], ours["median_ms"]),
            "max_diff": max_diff}


def _specs(grid, device, include_causal, include_window, include_backward, repeats) -> list[dict]:
    passes = ["fwd", "fwd+bwd"] if include_backward else ["fwd"]
    specs = []
    for dtype in grid["dtypes"]:
        for batch in grid["batch_sizes"]:
            for heads in grid["num_heads_list"]:
                for dim in grid["head_dims"]:
                    for seqlen in grid["seq_lengths"]:
                        shape = dict(batch=batch, heads=heads, seqlen=seqlen, head_dim=dim, dtype=dtype,
                                     device=device, repeats=repeats, window=None)
                        for causal in [False, True] if include_causal else [False]:
                            specs += [{**shape, "causal": causal, "pass": kind} for kind in passes]
                        if include_window and seqlen >= WINDOW_MIN_SEQLEN:
                            specs.append({**shape, "causal": True, "window": seqlen // 4, "pass": "fwd"})
    return specs


def _check_grid(grid: dict, repeats: int) -> None:
    for name in ("seq_lengths", "batch_sizes", "head_dims", "num_heads_list"):
        values = grid[name]
        if not values or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in values):
            raise ValueError(f"{name}: expected a non-empty list of ints >= 1, got {values!r}")
    for dtype in grid["dtypes"]:
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"dtypes: expected torch dtype names like 'float16', got {dtype!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: expected an int >= 1, got {repeats!r}")


def _served(calls, routes) -> str:
    from mfa_hf import trace

    ours = {backend for backend, _ in trace.served_by(calls) if backend != "native"}
    native = {path for path, _ in routes if path != "ours"}  # the fused kernel's name
    return "+".join(sorted(ours | native)) or "?"


def _label(row: dict) -> str:
    window = f" window={row['window']}" if row["window"] else ""
    timing = f"mfa {row['mfa_ms']} ms" + (f", sdpa {row['sdpa_ms']} ms, x{row['speedup']}" if row["sdpa_ms"] is not None else "")
    return (f"B={row['batch']} H={row['heads']} N={row['seqlen']} D={row['head_dim']} {row['dtype']} "
            f"causal={row['causal']}{window} {row['pass']}: {timing}")


def _kind(device: str) -> str:
    return "cpu" if device.startswith("cpu") else "gpu"


def _as_frame(rows: list[dict], as_frame: bool | None):
    if as_frame is False:
        return rows
    try:
        import pandas
    except ImportError:
        if as_frame:
            raise
        return rows
    return pandas.DataFrame(rows, columns=COLUMNS)
