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
default follows the table on compute capability 9.0 and later.
"""

from __future__ import annotations

import os

import torch

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


def launch_with_allocator(launch) -> None:
    """Run `launch()`. Where Triton reports that this thread has no allocator for the descriptors' scratch,
    give it ours and launch again: the allocation comes before the kernel is queued, so nothing ran. A
    thread whose allocator was set by someone else keeps it."""
    try:
        launch()
    except RuntimeError as error:
        if "no allocator was set" not in str(error):
            raise
        import triton

        triton.set_allocator(_scratch)
        launch()
