"""CUDA suite: forward and forward+backward TFLOP/s, triton backend vs SDPA (flash, cuDNN) and FlexAttention.

Shapes follow issue 9: B x N = 16384 tokens, H x D = 2048, N in 512..16384, D in {64, 128}, causal
and not, bf16 (and fp16). FLOPs count 4 * B * H * N^2 * D for the forward (halved when causal) and
3.5x that for forward+backward (backward 2.5x) (FlashAttention's convention). Times are medians of CUDA-event timed
calls after warm-up (measure.cuda_median_ms). Quick mode: fewer sequence lengths, bf16 only.
"""

from __future__ import annotations

import warnings

import torch

from ..cli_checks import UsageError

from .measure import cuda_median_ms


def _impls(causal: bool, n: int):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import mfa_hf

    def ours(q, k, v):  # (B, N, H, D) like FlashAttention
        return mfa_hf.flash_attn_func(q, k, v, causal=causal)

    def sdpa(backend):
        def call(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=causal)
        return call

    impls = {"mfa_triton": ours, "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
             "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # A fresh compile per shape: dynamo caches compiled variants on flex_attention's code object,
        # and past its recompile limit (8) it silently runs the unfused eager path (the invalid
        # numbers of the first H100 run). reset() empties that cache; a call that still warns that
        # flex ran without torch.compile raises instead of producing a number.
        torch._dynamo.reset()
        compiled = torch.compile(flex_attention, dynamic=False)
        mask = None
        if causal:
            mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, n, n, device="cuda")

        def flex(q, k, v):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask)
            if any("torch.compile" in str(w.message) for w in caught):
                raise RuntimeError("flex_attention ran without torch.compile (unfused path): not measured")
            return out

        impls["flex"] = flex
    except Exception as error:  # noqa: BLE001 - report, keep measuring the others
        print(f"flex attention unavailable: {error}")
    return impls


def _flops(batch, heads, n, dim, causal, backward):
    flops = 4 * batch * heads * n * n * dim / (2 if causal else 1)
    return flops * (3.5 if backward else 1.0)


def run(device: str, quick: bool, progress) -> list[dict]:
    if not device.startswith("cuda"):
        raise UsageError(f"--device: the cuda suite needs a cuda device, got {device}")
    lengths = (512, 2048, 8192) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    rows = []
    for dim in (128, 64):
        for causal in (False, True):
            for n in lengths:
                rows += _measure_shape(torch.bfloat16, dim, causal, n, progress)
    if not quick:  # float16 at two lengths: the kernels are the same, only the element type differs
        for n in (2048, 8192):
            rows += _measure_shape(torch.float16, 128, True, n, progress)
    return rows


def _measure_shape(dtype, dim, causal, n, progress) -> list[dict]:
    batch, heads = 16384 // n, 2048 // dim
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, n, heads, dim, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    grad = torch.randn(batch, n, heads, dim, device="cuda", dtype=dtype, generator=g)
    rows = []
    for name, call in _impls(causal, n).items():
        for backward in (False, True):
            row = dict(impl=name, dtype=str(dtype).replace("torch.", ""), head_dim=dim, seqlen=n, batch=batch,
                       heads=heads, causal=causal, pass_="fwd+bwd" if backward else "fwd")
            try:
                row.update(_time(call, q, k, v, grad, backward))
                row["tflops"] = round(_flops(batch, heads, n, dim, causal, backward) / row["median_ms"] / 1e9, 1)
            except Exception as error:  # noqa: BLE001 - one failing implementation must not hide the rest
                row["error"] = f"{type(error).__name__}: {str(error)[:80]}"
            progress(str(row))
            rows.append(row)
    return rows


def _time(call, q, k, v, grad, backward) -> dict:
    if not backward:
        with torch.no_grad():
            return cuda_median_ms(lambda: call(q, k, v))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def step():
        out = call(*leaves)
        grad_view = grad if out.shape == grad.shape else grad.transpose(1, 2)
        torch.autograd.grad(out, leaves, grad_view)

    return cuda_median_ms(step)
