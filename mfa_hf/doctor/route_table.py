"""`mfa-hf doctor --write-route-table`: this Mac's own gate table for the native route (opt-in).

For each gate of the default mps table (torch's prefill and vector-decode kernels) and each head dim it
lists, the platform kernel (MFA_BACKEND=native) and ours (MFA_BACKEND=metal) run the same call: the
native output is checked against the float64 reference with DESIGN.md's rule, and both are timed. A
head dim stays in the written table only where the native kernel was exact and at least as fast
(native_table.from_measurements). The file is `native_table.default_path()`, read by every later process.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from .. import native_table
from ..testing import assert_close_to_reference
from .timing import median_ms

PREFILL_LEN, DECODE_LEN = 1024, 4096


@contextmanager
def _backend(name: str):
    saved = os.environ.get("MFA_BACKEND")
    os.environ["MFA_BACKEND"] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MFA_BACKEND", None)
        else:
            os.environ["MFA_BACKEND"] = saved


def measure(device: str, gates, ours: str, runs: int, lengths=(PREFILL_LEN, DECODE_LEN),
            progress: Callable[[str], None] = lambda line: None) -> list[dict]:
    """One row per (gate, head dim): {path, dtype, head_dim, q_len, exact, native_s, ours_s, detail}."""
    import mfa_hf
    from mfa_hf.kernels.reference import attention_reference

    rows = []
    for gate in gates:
        decode = gate.max_q <= 8
        lq, lk = (1, lengths[1]) if decode else (lengths[0], lengths[0])
        for dim in gate.head_dims or (64, 128):
            dtype = gate.dtypes[0]
            g = torch.Generator().manual_seed(dim)
            q, k, v = (torch.randn(1, n, 8, dim, generator=g).to(dtype) for n in (lq, lk, lk))
            row = dict(path=gate.path, dtype=str(dtype).replace("torch.", ""), head_dim=dim, q_len=lq, exact=False,
                       native_s=float("inf"), ours_s=float("inf"), detail="")
            try:
                qd, kd, vd = (t.to(device) for t in (q, k, v))
                with _backend("native"):
                    out = mfa_hf.flash_attn_func(qd, kd, vd, causal=True)
                    row["native_s"] = median_ms(lambda: mfa_hf.flash_attn_func(qd, kd, vd, causal=True), device,
                                                runs) / 1e3
                ref, _ = attention_reference(q.double(), k.double(), v.double(), causal=True)
                base, _ = attention_reference(q, k, v, causal=True, upcast=False)
                assert_close_to_reference(out.cpu(), ref, base)
                row["exact"] = True
                with _backend(ours):
                    row["ours_s"] = median_ms(lambda: mfa_hf.flash_attn_func(qd, kd, vd, causal=True), device,
                                              runs) / 1e3
            except Exception as error:  # noqa: BLE001 - an inexact or failing kernel stays out of the table
                row["detail"] = f"{type(error).__name__}: {error}"[:300]
            rows.append(row)
            progress(f"route table: {gate.path} D={dim}: exact={row['exact']} native {row['native_s']:.3g} s, "
                     f"ours {row['ours_s']:.3g} s")
    return rows


NOT_A_MAC = ("--write-route-table: expected a Mac with an mps device (the table records this machine's timings); "
             "none here, nothing written")


def can_write_here() -> bool:
    """An mps device that is not the emulator: the only place the table's timings mean something."""
    return torch.backends.mps.is_available() and os.environ.get("MFA_METAL_EMULATOR") != "1"


def write_for_this_mac(runs: int, progress: Callable[[str], None] = print, path: Path | None = None) -> Path:
    """Measure on mps and write the table; refuses anywhere else (the figures would mean nothing)."""
    if not can_write_here():
        raise RuntimeError(NOT_A_MAC)
    rows = measure("mps", native_table.DEFAULT["mps"], "metal", runs, progress=progress)
    path = native_table.default_path() if path is None else path
    native_table.write(path, native_table.from_measurements("mps", rows))
    progress(f"route table written: {path} (delete it, or set MFA_ROUTE_TABLE=\"\", to use the defaults)")
    return path
