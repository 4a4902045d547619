"""Quick suite: every available backend vs torch.nn.functional.scaled_dot_product_attention.

Shapes are (B, H, N, D, causal); each row is one (shape, pass, implementation) measured in its own
subprocess. `x_sdpa` is SDPA's median time over ours (above 1: ours is faster).
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import dispatch
from ..problem import AttentionProblem
from .measure import ratio
from .runner import measure_in_subprocess

SHAPES = {  # (batch, heads, seqlen, head_dim, causal)
    "cpu": [(1, 8, 512, 64, False), (1, 8, 1024, 64, True), (1, 8, 2048, 64, True), (1, 4, 2048, 128, False)],
    "gpu": [(4, 16, 1024, 64, False), (4, 16, 1024, 64, True), (2, 16, 4096, 128, True), (1, 16, 8192, 128, True)],
}
BACKWARD_SHAPES = 2  # the first shapes also run forward + backward


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def available_backends(device: str, dtype: torch.dtype, shape) -> list[str]:
    batch, heads, seqlen, dim, causal = shape
    problem = AttentionProblem(device.split(":")[0], dtype, batch, seqlen, seqlen, heads, heads, dim, dim, causal)
    return [name for name in dispatch.PRIORITY if dispatch.backend(name).supports(problem)[0]]


def run(device: str, quick: bool, progress: Callable[[str], None]) -> list[dict]:
    dtype = torch.float32 if device == "cpu" else torch.float16
    shapes = SHAPES["cpu" if device == "cpu" else "gpu"][: 2 if quick else None]
    jobs = []
    for n, shape in enumerate(shapes):
        for kind in ("fwd", "fwd+bwd") if n < BACKWARD_SHAPES else ("fwd",):
            impls = [("sdpa", None)] + [("mfa", name) for name in available_backends(device, dtype, shape)]
            jobs.extend((shape, kind, impl, backend) for impl, backend in impls)
    rows, sdpa_ms = [], {}
    for i, (shape, kind, impl, backend) in enumerate(jobs, 1):
        batch, heads, seqlen, dim, causal = shape
        label = "sdpa" if impl == "sdpa" else f"mfa[{backend}]"
        progress(f"[{i}/{len(jobs)}] {label} {kind} B={batch} H={heads} N={seqlen} D={dim} causal={causal}")
        spec = dict(impl=impl, batch=batch, heads=heads, seqlen=seqlen, head_dim=dim, causal=causal,
                    dtype=str(dtype).replace("torch.", ""), device=device, repeats=5, **{"pass": kind})
        row = measure_in_subprocess("mfa_hf.benchmark.worker", spec, backend)
        row["impl"] = label
        key = (shape, kind)
        if impl == "sdpa":
            sdpa_ms[key] = row["median_ms"]
        row["x_sdpa"] = ratio(sdpa_ms[key], row["median_ms"])
        rows.append(row)
    return rows
