"""bf16_backward: backward time with and without it, and its gradient error against float64.

    PYTHONPATH=. python benchmarks/bf16_backward.py [--device cuda|cpu] [--seqlens 1024 2048] [--repeats 10]

Two tables:
1. error: max |grad - float64 reference| / max |float64 reference| for dQ, dK, dV, per input dtype,
   backend and mode (default / bf16_backward), on one small problem (the reference materializes scores);
2. speed: the backward alone (forward once, then torch.autograd.grad repeated on the same graph), median
   ms per mode, and speedup = default / bf16_backward, per backend that implements the option
   (cuda: triton and torch; cpu: torch), each forced with MFA_BACKEND.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import mfa_hf
from mfa_hf.benchmark.measure import cuda_median_ms, median_ms
from mfa_hf.benchmark.table import format_table
from mfa_hf.kernels.reference import attention_reference

ERROR_SHAPE = (2, 4, 384, 64)  # (B, H, S, D)
SEQLENS = {"cuda": (2048, 4096, 8192), "cpu": (512, 1024)}
SPEED_SHAPE = {"cuda": (4, 16, 128), "cpu": (1, 8, 64)}  # (B, H, D)
BACKENDS = {"cuda": ("triton", "torch"), "cpu": ("torch",)}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    return q, k, v, torch.randn(shape, generator=g).to(device, dtype)


def gradients(q, k, v, grad_out, causal, bf16_backward):
    out = mfa_hf.flash_attention(q, k, v, is_causal=causal, bf16_backward=bf16_backward)
    return torch.autograd.grad(out, (q, k, v), grad_out)


def reference_gradients(q, k, v, grad_out, causal):
    leaves = [t.detach().cpu().double().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    out, _ = attention_reference(*leaves, causal=causal)
    return torch.autograd.grad(out, leaves, grad_out.cpu().double().transpose(1, 2))


def relative_error(ours, reference) -> float:
    return float((ours.cpu().double() - reference).abs().max() / reference.abs().max())


def error_rows(device, backends, causal=True) -> list[dict]:
    rows = []
    for dtype in DTYPES:
        q, k, v, grad_out = inputs(ERROR_SHAPE, dtype, device)
        want = [g.transpose(1, 2) for g in reference_gradients(q, k, v, grad_out, causal)]
        for backend in backends:
            with forced(backend):
                for bf16 in (False, True):
                    got = gradients(q, k, v, grad_out, causal, bf16)
                    errors = {f"err_d{n}": f"{relative_error(g, w):.2e}" for n, g, w in zip("qkv", got, want)}
                    rows.append({"dtype": str(dtype)[6:], "backend": backend,
                                 "mode": "bf16_backward" if bf16 else "default", **errors})
    return rows


def speed_rows(device, backends, seqlens, repeats) -> list[dict]:
    batch, heads, dim = SPEED_SHAPE[device]
    rows = []
    for dtype in (torch.float32, torch.float16):
        for seqlen in seqlens:
            q, k, v, grad_out = inputs((batch, heads, seqlen, dim), dtype, device)
            for backend in backends:
                times = {}
                with forced(backend):
                    for bf16 in (False, True):
                        out = mfa_hf.flash_attention(q, k, v, is_causal=True, bf16_backward=bf16)

                        def backward():
                            return torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)

                        timing = cuda_median_ms(backward, repeats) if device == "cuda" else \
                            median_ms(backward, device, repeats)
                        times[bf16] = timing["median_ms"]
                rows.append({"dtype": str(dtype)[6:], "backend": backend, "B": batch, "H": heads, "S": seqlen,
                             "D": dim, "causal": True, "bwd_ms": times[False], "bwd_ms_bf16": times[True],
                             "speedup": round(times[False] / times[True], 2)})
    return rows


class forced:
    """MFA_BACKEND=name inside the block (dispatch reads it per call)."""

    def __init__(self, name):
        self.name, self.saved = name, None

    def __enter__(self):
        self.saved = os.environ.get("MFA_BACKEND")
        os.environ["MFA_BACKEND"] = self.name

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop("MFA_BACKEND", None)
        else:
            os.environ["MFA_BACKEND"] = self.saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--seqlens", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    device = args.device
    backends = BACKENDS[device]
    repeats = args.repeats or (20 if device == "cuda" else 3)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"# bf16_backward on {name}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads")
    print(f"# gradient error vs float64 (max abs error / max abs reference), B,H,S,D = {ERROR_SHAPE}, causal")
    print(format_table(error_rows(device, backends)))
    print("# backward time (median ms), causal")
    print(format_table(speed_rows(device, backends, args.seqlens or SEQLENS[device], repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
