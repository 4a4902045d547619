"""Where the host time of one Triton-served call goes, on a CUDA machine: cProfile over many calls of a tiny
forward (the GPU idles), of a bf16 decode call, of a training step (forward with grad + autograd.grad) and of a
model's decode layer (the decode plan), the top functions by own time; then the compiled kernel
launched three ways with the launcher's exact arguments (Triton's JIT `run`, `CompiledKernel[grid](...)`,
and the compiled launcher's `run` with the stream and metadata passed in), µs per call.

    MFA_BACKEND=triton PYTHONPATH=. python benchmarks/triton/host_profile.py
"""

from __future__ import annotations

import torch

from host_overhead import host_us  # siblings: a script's own folder is on sys.path
from native_route_check import profile_calls


def main() -> None:
    import mfa_hf
    from mfa_hf.decode_plan import DecodePlan, LayerKV
    from mfa_hf.kernels.contract import CacheSide
    from mfa_hf.kernels.triton import forward as tf
    from mfa_hf.kernels.triton import forward_kernel

    print(torch.cuda.get_device_name(), torch.__version__)
    q, k, v = (torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        profile_calls("flash_attn_func, tiny forward", lambda: mfa_hf.flash_attn_func(q, k, v, causal=True), 3000)
        qd = torch.randn(8, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
        k_cache, v_cache = (torch.randn(8, 256, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        profile_calls("flash_attn_with_kvcache bf16, int lengths",
                      lambda: mfa_hf.flash_attn_with_kvcache(qd, k_cache, v_cache, cache_seqlens=200), 3000)
        plan = DecodePlan(8, 1)
        layer = LayerKV(CacheSide(k_cache, None, "none", 128), CacheSide(v_cache, None, "none", 128), 200)
        profile_calls("decode plan layer, plain cache", lambda: plan.run(qd, layer, scale=128 ** -0.5), 3000)
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)
    profile_calls("training step (forward with grad + autograd.grad)",
                  lambda: torch.autograd.grad(mfa_hf.flash_attn_func(*leaves, causal=True), leaves, grad), 1000)

    # The compiled kernel, three ways, with the launcher's exact arguments.
    captured = {}
    jit_run = forward_kernel.attention_forward_kernel.run

    def capture(*a, **kw):
        captured.update(a=a, kw=kw)
        return jit_run(*a, **kw)

    forward_kernel.attention_forward_kernel.run = capture
    tf.forget_plans()
    mfa_hf.flash_attn_func(q, k, v, causal=True)
    forward_kernel.attention_forward_kernel.run = jit_run
    a, kw = captured["a"], dict(captured["kw"])
    grid = kw.pop("grid")
    kw.pop("warmup", None)
    compiled = jit_run(*a, grid=grid, warmup=False, **kw)
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    runner = compiled[grid3]
    n_params = len(forward_kernel.attention_forward_kernel.params)
    names = [p.name for p in forward_kernel.attention_forward_kernel.params]
    tail = tuple(kw[n] if n in kw else forward_kernel.attention_forward_kernel.params[i].default
                 for i, n in enumerate(names) if i >= len(a))
    args = (*a, *tail)
    stream = torch.cuda.current_stream().cuda_stream
    rows = {
        "JITFunction.run": lambda: jit_run(*a, grid=grid, warmup=False, **kw),
        "CompiledKernel[grid](*args)": lambda: runner(*args),
        "compiled.run(grid, stream, function, metadata, ...)": lambda: compiled.run(
            grid3[0], grid3[1], grid3[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
            *args),
        "torch.empty x2": lambda: (torch.empty_like(q), torch.empty(1, 2, 64, device="cuda")),
    }
    print(f"launch µs per call ({n_params} kernel parameters, {len(args)} passed):")
    for name, fn in rows.items():
        try:
            print(f"  {name:55s} {host_us(fn, 3000):8.1f}", flush=True)
        except Exception as error:  # noqa: BLE001 - a way this Triton does not offer is reported
            print(f"  {name:55s} failed: {type(error).__name__}: {error}", flush=True)


if __name__ == "__main__":
    main()
