"""Timing: our metal kernels against torch's own mps SDPA (torch >= 2.13 ships flash prefill and
vector decode kernels for mps) and against MLX's fused SDPA when mlx is installed (mlx_timing.py),
median of N runs, each bracketed by a synchronisation (torch.mps.synchronize(), mx.synchronize()).

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

from . import mlx_timing
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
    backward: bool = False  # forward + backward (gradients of q, k, v), as a training step runs it


SHAPES = (
    Shape("prefill causal B=1 H=16 L=1024 D=64", 1, 16, 1024, 1024, 64, True),
    Shape("prefill causal B=1 H=16 L=1024 D=128", 1, 16, 1024, 1024, 128, True),
    Shape("prefill causal B=1 H=16 L=4096 D=64", 1, 16, 4096, 4096, 64, True),
    Shape("prefill causal B=1 H=16 L=4096 D=128", 1, 16, 4096, 4096, 128, True),
    Shape("decode B=1 H=16 L_k=4096 D=128", 1, 16, 1, 4096, 128, True, decode=True),
    Shape("diffusers-like non-causal B=2 H=10 L=4096 D=64", 2, 10, 4096, 4096, 64, False),
    Shape("forward+backward causal B=1 H=16 L=1024 D=64", 1, 16, 1024, 1024, 64, True, backward=True),
    Shape("forward+backward causal B=1 H=16 L=1024 D=128", 1, 16, 1024, 1024, 128, True, backward=True),
)
# Under the emulator (--time): small shapes, only to run the code path.
EMULATED_SHAPES = (
    Shape("prefill causal B=1 H=2 L=64 D=64 (emulated, code path only)", 1, 2, 64, 64, 64, True),
    Shape("decode B=1 H=2 L_k=128 D=64 (emulated, code path only)", 1, 2, 1, 128, 64, True, decode=True),
    Shape("forward+backward B=1 H=2 L=64 D=64 (emulated, code path only)", 1, 2, 64, 64, 64, True, backward=True),
)


def _row(shape: Shape, status: str, runs: int, mlx_detail: str = "") -> dict:
    return {"shape": shape.name, "status": status, "ours_ms": None, "sdpa_ms": None, "speedup": None,
            "mlx_ms": None, "mlx_speedup": None, "mlx_detail": mlx_detail, "runs": runs, "detail": ""}


def not_measured_rows() -> list[dict]:
    return [_row(s, NOT_MEASURED, 0, mlx_timing.unavailable_reason(emulated=True)) for s in SHAPES]


def run_timing(device: str, emulated: bool, runs: int, progress: Callable[[str], None] = lambda line: None) -> list[dict]:
    shapes = EMULATED_SHAPES if emulated else SHAPES
    mlx_reason = mlx_timing.unavailable_reason(emulated)
    rows = []
    for shape in shapes:
        rows.append(time_shape(shape, device, emulated, runs, mlx_reason))
        progress(f"timing: {shape.name}: {rows[-1]['status']}")
    return rows


def time_shape(shape: Shape, device: str, emulated: bool, runs: int, mlx_reason: str | None = None) -> dict:
    """Ours and SDPA (a failure of either fails the row), then MLX unless `mlx_reason` says why not
    (an MLX failure is reported in mlx_detail; it does not fail our row)."""
    row = _row(shape, "failed", runs, mlx_reason or "")
    try:
        ours, sdpa, sdpa_inputs = _calls(shape, device)
        with metal_forced():
            row["ours_ms"] = median_ms(ours, device, runs)
        row["sdpa_ms"] = median_ms(sdpa, device, runs)
    except Exception as error:  # a crash at a real shape is a failure worth reporting
        row["detail"] = _error(error)
        return row
    if emulated:  # CPU emulation against CPU SDPA: no ratio means anything
        row["status"] = EXERCISED
        return row
    row["speedup"] = _ratio(row["sdpa_ms"], row["ours_ms"])
    row["status"] = "measured"
    if mlx_reason is None:
        try:
            row["mlx_ms"] = median_ms(mlx_timing.mlx_call(*sdpa_inputs, backward=shape.backward), "mlx", runs)
            row["mlx_speedup"] = _ratio(row["mlx_ms"], row["ours_ms"])
            row["mlx_detail"] = "measured"
        except Exception as error:
            row["mlx_detail"] = f"MLX failed: {_error(error)}"
    return row


def _ratio(theirs: float, ours: float) -> float | None:
    return round(theirs / ours, 3) if ours else None


def _error(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:2000]


def _calls(shape: Shape, device: str) -> tuple[Callable[[], object], Callable[[], object], tuple]:
    """Ours (FA layout (B, S, H, D)) and SDPA ((B, H, S, D)), each on contiguous inputs of its layout,
    and SDPA's inputs with its causal flag (what MLX is timed on)."""
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
                lambda: sdpa(qt, kt, vt), (qt, kt, vt, False))  # one query over every key: no mask needed
    if shape.backward:  # our backward kernels against SDPA's mps backward (O(N^2) math on torch <= 2.13)
        grad = randn(b, shape.lq, h, d)
        grad_t = grad.transpose(1, 2).contiguous()
        leaves, leaves_t = [t.requires_grad_() for t in (q, k, v)], [t.requires_grad_() for t in (qt, kt, vt)]
        return (lambda: torch.autograd.grad(mfa_hf.flash_attn_func(*leaves, causal=shape.causal), leaves, grad),
                lambda: torch.autograd.grad(sdpa(*leaves_t, is_causal=shape.causal), leaves_t, grad_t),
                (qt, kt, vt, shape.causal))
    return (lambda: mfa_hf.flash_attn_func(q, k, v, causal=shape.causal),
            lambda: sdpa(qt, kt, vt, is_causal=shape.causal), (qt, kt, vt, shape.causal))


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
    """torch's mps queue; other devices ("cpu", "mlx": its calls synchronise themselves) need nothing."""
    if str(device).split(":")[0] == "mps":
        torch.mps.synchronize()
