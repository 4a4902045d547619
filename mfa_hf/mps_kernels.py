"""mps-flash-attn's is_available / precompile / clear_cache, as what they mean for mfa-hf's Metal kernels.

- is_available(): True when the Metal kernels can run here (an mps device and the metal backend loaded),
  as mps-flash-attn's (its extension and an mps device). mfa_hf's functions work without it (any device,
  torch backend); the name answers the question its callers ask before putting tensors on mps.
- precompile(): on a Mac, compiles every Metal variant the dispatcher can pick (the doctor's quick
  selection, through the loader's own per-process cache); elsewhere there is nothing to compile and it
  does nothing. Either way it returns what it did. mps-flash-attn compiled one pipeline per sequence
  length to a disk cache; our variants never depend on a length and live in the process.
- clear_cache(): mfa-hf keeps no kernel cache on disk, so there is nothing to delete; it returns that.
"""

from __future__ import annotations

import torch


def is_available() -> bool:
    from . import dispatch

    return bool(torch.backends.mps.is_available()) and dispatch.backend("metal").impl is not None


def precompile(full: bool = False) -> dict:
    """Compile the Metal variants now (full=True: the doctor's full covering set). Returns
    {"device", "compiled", "failed", "note"}: variant ids compiled, {id: error} that failed."""
    if not is_available():
        return {"device": None, "compiled": [], "failed": {},
                "note": "no mps device with the metal backend here: nothing to compile (the torch backend needs none)"}
    from .doctor.variants import enumerate_variants
    from .kernels.metal import loader

    device = torch.device("mps")
    compiled, failed = [], {}
    for item in enumerate_variants(quick=not full, device_type="mps").planned:
        if item.error:
            failed[item.id] = item.error
            continue
        try:
            loader.library(item.variant, device, item.param_count)
        except Exception as error:  # remembered by the loader: calls of that variant use the torch backend
            failed[item.id] = f"{type(error).__name__}: {error}"
        else:
            compiled.append(item.id)
    return {"device": "mps", "compiled": compiled, "failed": failed,
            "note": "compiled in this process; variants do not depend on sequence lengths"}


def clear_cache() -> dict:
    """Nothing on disk to clear (mps-flash-attn deleted its precompiled-kernel files)."""
    return {"cleared": 0, "note": "mfa-hf keeps no kernel cache on disk; compiled Metal libraries live in the "
                                  "process and are freed when it exits"}
