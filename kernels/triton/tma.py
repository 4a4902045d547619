"""When the forward kernel streams K and V through Hopper's tensor memory accelerator (TMA).

A TMA load is one asynchronous copy of a whole tile issued by one thread, instead of every thread
computing and checking addresses; the descriptor's bounds zero the rows past a sequence and the
columns past the head dim, exactly what the pointer loads' masks do. The hardware asks for a
16-byte aligned base, 16-byte multiples for every stride but the last, and a unit last stride: a
layout that does not meet them takes the pointer loads (same kernel, same results).

The kernel builds its descriptors on the device (`tl.make_tensor_descriptor`), so each launch needs a
little global scratch from Triton's allocator. Triton keeps that allocator in a context variable that
a new thread starts without (transformers' TextIteratorStreamer runs generate() in one), and it has no
public way to ask for it; so a TMA launch that Triton refuses for want of one sets ours and launches
again, and an allocator someone else set is never replaced.

The block table (blocks.py) says where it pays: MFA_TRITON_TMA=0 turns it off, =1 uses it wherever the
layout allows, Triton's interpreter included (tests cover the descriptor path on CPU that way); the
default follows the table on compute capability 9.0 and later. Only the forward uses it: TMA in the
backward's streamed tiles (Q/dO for dK/dV, K/V for dQ) was no faster on the H200 and crashed ptxas for
every non-causal shape (results/h200-backward-tma-2026-12-04-session4.log).
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError

_capable: dict = {}


def _mode() -> str:
    return os.environ.get("MFA_TRITON_TMA", "auto")


def _device_capable(device: torch.device) -> bool:
    if device.type == "cpu":  # Triton's interpreter: the descriptor semantics, no hardware
        return _mode() == "1"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capable:
        _capable[index] = torch.cuda.get_device_capability(index) >= (9, 0)
    return _capable[index]


def _aligned(t: torch.Tensor, strides: tuple) -> bool:
    size = t.element_size()
    return (strides[-1] == 1 and not (t.data_ptr() % 16)
            and all(not (s * size % 16) for s in strides[:-1]))


def chosen(preferred: bool, k: torch.Tensor, v: torch.Tensor, k_strides: tuple, v_strides: tuple) -> bool:
    """Whether the forward reads k and v (strides: batch, seq, head, dim; a broadcast batch has stride 0)
    through TMA: where the block table prefers it (or MFA_TRITON_TMA=1), the device has it and the layout
    allows it."""
    mode = _mode()
    if mode == "0" or not (preferred or mode == "1") or not _device_capable(k.device):
        return False
    return _aligned(k, k_strides) and _aligned(v, v_strides)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def missing_allocator(error: RuntimeError) -> bool:
    """Whether Triton refused a launch, before queueing it, for want of an allocator in this thread."""
    return "no allocator was set" in str(error)


def launch(uses_tma: bool, launch, without_tma) -> bool:
    """Run `launch()`; False when TMA had to be given up and `without_tma()` ran instead.

    - Triton refuses a TMA kernel in a thread that has no allocator for the descriptors' scratch: this
      gives the thread ours and launches again (the allocation comes before the kernel is queued, so
      nothing ran). A thread whose allocator was set by someone else keeps it.
    - Triton 3.6's ptxas crashed on some block shapes with descriptors ((128, 128, 8, 2) forward; every
      backward tried): a kernel that does not build with TMA is launched with the pointer loads, which
      give the same results, and the caller keeps that choice for the kind of call.
    """
    if not uses_tma:
        launch()
        return True
    try:
        try:
            launch()
        except RuntimeError as error:
            if not missing_allocator(error):
                raise
            triton.set_allocator(_scratch)
            launch()
    except (CompilationError, OutOfResources, PTXASError) as error:
        warnings.warn(f"mfa_hf: the Triton forward did not build with TMA descriptors ({type(error).__name__}); "
                      "using pointer loads for this kind of call", RuntimeWarning, stacklevel=3)
        without_tma()
        return False
    return True
