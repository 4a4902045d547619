"""Interleaved timing for the CPU benchmark scripts (imported by file from this folder, not a package).

Every variant runs once per round in turn, so a slow spell of a noisy host lands on all of them; each sample is
the mean of `repeat` back-to-back calls (µs-scale calls are timed in batches)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def interleaved_seconds(runs: dict[str, Callable[[], object]], rounds: int, repeat: int = 1,
                        warmup: int = 1) -> dict[str, list[float]]:
    """{variant: seconds per call, one sample per round}."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            times[name].append((time.perf_counter() - start) / repeat)
    return times


def summary(times: dict[str, list[float]], baseline: str = "sdpa"):
    """(variant, median s, fastest s, median / the baseline's median) for each variant, in order."""
    base = statistics.median(times[baseline])
    for name, samples in times.items():
        median = statistics.median(samples)
        yield name, median, min(samples), median / base


def print_header(what: str, rounds: int, columns: tuple[str, ...]) -> None:
    """The record's first lines: what ran, where (torch, threads), rounds and date; then a markdown table head."""
    print(f"# {what}, torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} interleaved rounds, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
