"""One measurement in a fresh process: `python -m mfa_hf.benchmark.worker '<json spec>'` prints a JSON row.

A spec names the implementation ("sdpa", or "mfa" with MFA_BACKEND set by the caller), the shape
(batch, heads, seqlen, head_dim, causal, dtype, device) and the pass ("fwd" or "fwd+bwd"); optional for
"mfa": window (flash_attention's window_size) and bf16_backward.
"""

from __future__ import annotations

import json
import sys

import torch

from .measure import peak_memory, start_memory, timed_then_named


def attention_call(spec: dict):
    import torch.nn.functional as F

    import mfa_hf

    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (spec["batch"], spec["heads"], spec["seqlen"], spec["head_dim"])
    backward = spec["pass"] == "fwd+bwd"
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype).requires_grad_(backward) for _ in range(3))
    causal = spec["causal"]
    if spec["impl"] == "sdpa":
        def forward():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        window, bf16_backward = spec.get("window"), spec.get("bf16_backward", False)

        def forward():
            return mfa_hf.flash_attention(q, k, v, is_causal=causal, window_size=window, bf16_backward=bf16_backward)

    def call():
        if not backward:
            with torch.no_grad():
                return forward()
        out = forward()
        out.backward(torch.ones_like(out))
        return out

    return call


def measure(spec: dict) -> dict:
    from mfa_hf import trace

    # A tiny call first loads what the first call loads (imports, op registration, allocator pools),
    # so that the memory growth measured next is the attention's own.
    attention_call({**spec, "batch": 1, "heads": 1, "seqlen": 16})()
    call = attention_call(spec)
    before = start_memory(spec["device"])
    timing, calls, _ = timed_then_named(call, spec["device"], spec.get("repeats", 5), warmup=2)
    served = sorted({backend for backend, _ in trace.served_by(calls)})
    return {**spec, **timing, **peak_memory(spec["device"], before), "served_by": "+".join(served) or "torch.nn.functional"}


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
