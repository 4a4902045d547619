"""Timing and peak memory for benchmark workers, the same way on every device.

Peak memory is per measurement: each one runs in its own subprocess (see worker.py), so that
    cpu   the growth of the subprocess's own peak RSS (peak_rss.py) over what it held before the measured calls
    cuda  torch.cuda.max_memory_allocated over the calls
    mps   torch.mps.driver_allocated_memory after the calls (mps exposes no peak counter)
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from ..peak_rss import peak_rss_bytes


def significant(value: float, digits: int = 4) -> float:
    """value rounded to `digits` significant figures: a fast call never reads as 0 ms (round(x, 3) did)."""
    return float(f"{value:.{digits}g}")


def ratio(numerator: float, denominator: float, digits: int = 4) -> float:
    """numerator / denominator to `digits` significant figures, so a ratio far below 1 stays above 0."""
    return significant(numerator / denominator, digits)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device.startswith("mps"):
        torch.mps.synchronize()


def peak_rss_mb() -> float:
    return peak_rss_bytes() / 2**20


def start_memory(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    return peak_rss_mb()


def peak_memory(device: str, before_mb: float) -> dict:
    """Memory the measured calls needed beyond what was held before them, and how it was read."""
    if device.startswith("cuda"):
        return {"peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20 - before_mb, 1),
                "mem_method": "torch.cuda.max_memory_allocated"}
    if device.startswith("mps"):
        return {"peak_mem_mb": round(torch.mps.driver_allocated_memory() / 2**20, 1),
                "mem_method": "torch.mps.driver_allocated_memory after the calls (no peak counter)"}
    growth = round(peak_rss_mb() - before_mb, 1)
    if growth <= 0:  # a high-water mark set earlier (the inputs' creation): the calls' own peak is unknown, not 0
        return {"peak_mem_mb": None, "mem_method": "peak RSS growth of a subprocess",
                "peak_mem_mb_reason": "not measured: no peak-memory counter on cpu (the process's peak RSS did "
                                      "not grow above its earlier high-water mark)"}
    return {"peak_mem_mb": growth, "mem_method": "peak RSS growth of a subprocess"}


def median_ms(call: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        call()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": significant(statistics.median(times)), "min_ms": significant(min(times)), "repeats": repeats}


def cuda_median_ms(call: Callable[[], object], repeats: int = 20, warmup: int = 3) -> dict:
    """Median of CUDA-event timed calls (device time between the events, no host synchronization inside)."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": significant(statistics.median(times)), "min_ms": significant(min(times)), "repeats": repeats}


# ---- naming what served without paying for it -----------------------------------------------------------------
# A traced call (mfa_hf.trace capture open) records its route and skips the replays that make a repeated call cheap
# on the host (mfa_hf/api.py, mfa_hf/decode_plan.py): timing under a capture times a path no user takes. So calls
# are timed untraced and named by one more traced call afterwards.

def timed_then_named(call: Callable[[], object], device: str, repeats: int, warmup: int = 1):
    """(median_ms's timing of untraced calls, the kernels' counter, the routes' counter) of one traced call after."""
    from mfa_hf import trace

    timing = median_ms(call, device, repeats, warmup)
    with trace.capture() as calls, trace.capture_routes() as routes:
        call()
        synchronize(device)
    return timing, calls, routes


class PrefillTraced:
    """A generate() streamer around `inner` whose trace capture (`calls`) is open for the prefill only: it closes at
    the first new token, so the timed decode steps run untraced. `named_step(lm, tokens, cache_kwargs)` then adds one
    traced decode step after the timing, at the final length."""

    def __init__(self, inner):
        from mfa_hf import trace

        self.inner, self._puts = inner, 0
        self._capture = trace.capture()
        self.calls = self._capture.__enter__()

    def put(self, value):
        self._puts += 1
        if self._puts == 2:  # the first put carries the prompt, the second the first new token
            self._close()
        self.inner.put(value)

    def end(self):
        self._close()
        self.inner.end()

    def _close(self):
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None

    def named_step(self, lm, tokens, cache_kwargs: dict) -> None:
        from mfa_hf import trace

        self._close()
        with torch.inference_mode(), trace.capture() as step:
            lm(tokens[:, -1:], **cache_kwargs, use_cache=True)
        self.calls.update(step)
