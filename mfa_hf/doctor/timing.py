"""Timing: our metal kernels against torch's own mps SDPA (torch >= 2.13 ships flash prefill and
vector decode kernels for mps), median of N runs, each bracketed by torch.mps.synchronize().

Only meaningful on a Mac. Under the emulator the figures would time a CPU emulation against
nothing comparable, so they are reported as "not measured (emulated)"; `--time` there runs small
shapes only, to exercise this code.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .correctness import metal_forced

NOT_MEASURED = "not measured (emulated)"
EXERCISED = "code path exercised (emulated: not a measurement)"


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    lq: int
    lk: int
    dim: int
    causal: bool
    decode: bool = False
    dtype: torch.dtype = torch.float16


SHAPES = (
    Shape("prefill causal B=1 H=16 L=1024 D=64", 1, 16, 1024, 1024, 64, True),
    Shape("prefill causal B=1 H=16 L=1024 D=128", 1, 16, 1024, 1024, 128, True),
    Shape("prefill causal B=1 H=16 L=4096 D=64", 1, 16, 4096, 4096, 64, True),
    Shape("prefill causal B=1 H=16 L=4096 D=128", 1, 16, 4096, 4096, 128, True),
    Shape("decode B=1 H=16 L_k=4096 D=128", 1, 16, 1, 4096, 128, True, decode=True),
    Shape("diffusers-like non-causal B=2 H=10 L=4096 D=64", 2, 10, 4096, 4096, 64, False),
)
# Under the emulator (--time): small shapes, only to run the code path.
EMULATED_SHAPES = (
    Shape("prefill causal B=1 H=2 L=64 D=64 (emulated, code path only)", 1, 2, 64, 64, 64, True),
    Shape("decode B=1 H=2 L_k=128 D=64 (emulated, code path only)", 1, 2, 1, 128, 64, True, decode=True),
)


def not_measured_rows() -> list[dict]:
    return [{"shape": s.name, "status": NOT_MEASURED, "ours_ms": None, "sdpa_ms": None, "speedup": None,
             "runs": 0, "detail": ""} for s in SHAPES]


def run_timing(device: str, emulated: bool, runs: int, progress: Callable[[str], None] = lambda line: None) -> list[dict]:
    shapes = EMULATED_SHAPES if emulated else SHAPES
    rows = []
    for shape in shapes:
        rows.append(time_shape(shape, device, emulated, runs))
        progress(f"timing: {shape.name}: {rows[-1]['status']}")
    return rows


def time_shape(shape: Shape, device: str, emulated: bool, runs: int) -> dict:
    row = {"shape": shape.name, "status": "failed", "ours_ms": None, "sdpa_ms": None, "speedup": None,
           "runs": runs, "detail": ""}
    try:
        ours, sdpa = _calls(shape, device)
        with metal_forced():
            row["ours_ms"] = median_ms(ours, device, runs)
        row["sdpa_ms"] = median_ms(sdpa, device, runs)
    except Exception as error:  # a crash at a real shape is a failure worth reporting
        row["detail"] = f"{type(error).__name__}: {error}"[:2000]
        return row
    if emulated:  # CPU emulation against CPU SDPA: no ratio means anything
        row["status"] = EXERCISED
    else:
        row["speedup"] = round(row["sdpa_ms"] / row["ours_ms"], 3) if row["ours_ms"] else None
        row["status"] = "measured"
    return row


def _calls(shape: Shape, device: str) -> tuple[Callable[[], object], Callable[[], object]]:
    """Ours (FA layout (B, S, H, D)) and SDPA ((B, H, S, D)), each on contiguous inputs of its layout."""
    import mfa_hf

    sdpa = torch.nn.functional.scaled_dot_product_attention
    g = torch.Generator().manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=g).to(shape.dtype).to(device)

    b, h, d = shape.batch, shape.heads, shape.dim
    q, k, v = randn(b, shape.lq, h, d), randn(b, shape.lk, h, d), randn(b, shape.lk, h, d)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    if shape.decode:
        lengths = torch.full((b,), shape.lk, dtype=torch.int32, device=device)
        return (lambda: mfa_hf.flash_attn_with_kvcache(q, k, v, cache_seqlens=lengths, causal=True),
                lambda: sdpa(qt, kt, vt))  # one query over every key: no mask needed
    return (lambda: mfa_hf.flash_attn_func(q, k, v, causal=shape.causal),
            lambda: sdpa(qt, kt, vt, is_causal=shape.causal))


def median_ms(call: Callable[[], object], device: str, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        _synchronize(device)
        start = time.perf_counter()
        call()
        _synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(samples), 4)


def _synchronize(device: str) -> None:
    if torch.device(device).type == "mps":
        torch.mps.synchronize()
