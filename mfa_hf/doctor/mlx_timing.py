"""The MLX side of the doctor's timing: mlx.core.fast.scaled_dot_product_attention on the same shape
and the same values as ours (converted from the torch tensors), each run forced with mx.eval and
followed by mx.synchronize, so that the median is the wall time of finished work.

MLX runs on Apple silicon Macs only. Elsewhere, or when `mlx` is not importable, or under the
emulator (CPU emulation against a GPU kernel would compare nothing), every row says why it has no
MLX figure instead.
"""

from __future__ import annotations

import importlib
import platform
import sys
from typing import Callable

import torch


def unavailable_reason(emulated: bool) -> str | None:
    """None when MLX can be timed here, else the reason it is not (shown in the report)."""
    if emulated:
        return "MLX not timed: the kernels are emulated on the CPU here"
    if sys.platform != "darwin" or platform.machine() != "arm64":
        return f"MLX not timed: MLX runs on Apple silicon Macs only (this is {sys.platform} {platform.machine()})"
    try:
        importlib.import_module("mlx.core")
    except Exception as error:  # ImportError, or a broken install raising anything else
        return f"MLX not timed: mlx is not importable ({type(error).__name__}: {error}); pip install mlx"
    return None


def mlx_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, backward: bool = False) -> Callable[[], None]:
    """MLX's fused SDPA on copies of q, k, v ((B, H, S, D), as torch's SDPA takes them), one call per
    invocation, evaluated and synchronised before it returns. Causal masking is MLX's `"causal"`
    mask (bottom-right aligned, as ours for L_q <= L_k); one query row needs no mask. backward: the
    output and the gradients of q, k, v through mx.vjp (whatever MLX's VJP of its SDPA runs)."""
    import mlx.core as mx

    dtype = {torch.float16: mx.float16, torch.bfloat16: mx.bfloat16, torch.float32: mx.float32}[q.dtype]
    # numpy has no bfloat16: go through float32 and let MLX round back (exact for values that came from bf16).
    qm, km, vm = (mx.array(t.detach().float().cpu().numpy()).astype(dtype) for t in (q, k, v))
    mx.eval(qm, km, vm)
    scale = q.shape[-1] ** -0.5
    mask = "causal" if causal and q.shape[-2] > 1 else None
    sdpa = mx.fast.scaled_dot_product_attention

    def attention(a, b, c):
        return sdpa(a, b, c, scale=scale, mask=mask)

    if backward:
        cotangent = mx.ones(qm.shape[:-1] + (vm.shape[-1],), dtype=dtype)

        def call() -> None:
            outputs, grads = mx.vjp(attention, [qm, km, vm], [cotangent])
            mx.eval(outputs, grads)
            mx.synchronize()

        return call

    def call() -> None:
        mx.eval(attention(qm, km, vm))
        mx.synchronize()

    return call
