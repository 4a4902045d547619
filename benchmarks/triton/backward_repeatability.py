"""The triton backward on a GPU, for every block configuration its tables can pick: each is checked
against the float64 reference and run REPEATS times on the same inputs, which must agree bitwise
(the backward uses no atomics, so any difference is a race).

    PYTHONPATH=. python benchmarks/triton/backward_repeatability.py           # the tables' configurations
    PYTHONPATH=. python benchmarks/triton/backward_repeatability.py --probe   # also alternatives per head dim

tests/triton/test_backward_repeatable.py runs the first on any CUDA machine. --probe reruns the
head dims given with other dK/dV block shapes and stage counts, to tell which property of a
configuration a failure follows (how the dK race of issue 16 was located).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from contextlib import contextmanager

import torch

from mfa_hf.kernels.triton import blocks, forward

REPEATS = 20
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def table_configurations() -> list[tuple[int, torch.dtype, bool, int]]:
    """(head dim, dtype, causal, sequence length) reaching every entry of the backward tables (float32 halves
    BLOCK_N, so it selects other configurations than the 2-byte types; a head dim with a short-sequence entry is
    also run past blocks.SMALL_BACKWARD_N, where the long-sequence entries serve: dK/dV's and dQ's)."""
    dims = sorted(set(blocks._BACKWARD_KV) | set(blocks._BACKWARD_Q))
    short = [(dim, dtype, causal, 509) for dim in dims for dtype in DTYPES for causal in (False, True)]
    long = [(dim, dtype, causal, blocks.SMALL_BACKWARD_N + 61) for dim in sorted(blocks._BACKWARD_KV_SMALL)
            for dtype in (torch.bfloat16,) for causal in (False, True)]
    return short + long


@contextmanager
def dkdv_blocks(dim: int, chosen: blocks.Blocks | None):
    """Use `chosen` for the dK/dV pass at this (padded) head dim while inside."""
    if chosen is None:
        yield
        return
    saved = blocks._BACKWARD_KV[dim]
    blocks._BACKWARD_KV[dim] = chosen
    forward.forget_plans()  # launch plans hold the block choice
    try:
        yield
    finally:
        blocks._BACKWARD_KV[dim] = saved
        forward.forget_plans()


def check(dim: int, dtype: torch.dtype, causal: bool, repeats: int = REPEATS, seqlen: int = 509,
          deterministic: bool = True) -> str:
    """Correctness against the reference, then `repeats` bitwise-equal backward runs. Returns a one-line
    summary; raises AssertionError naming the first gradient that failed."""
    import mfa_hf
    from mfa_hf.testing import Case, check_against_reference, make_inputs

    case = Case(dtype=dtype, batch=2, lq=seqlen, lk=seqlen + 6, heads_q=4, heads_kv=2, dim=dim, dim_v=dim,
                causal=causal)
    check_against_reference(case, backend="triton", device="cuda")
    inputs = make_inputs(case, device="cuda", seed=1, requires_grad=True)
    leaves = [inputs[name] for name in ("q", "k", "v")]
    grad = torch.randn(case.batch, case.lq, case.heads_q, case.dim_v, device="cuda").to(dtype)
    first = None
    for run in range(repeats):
        out = mfa_hf.flash_attn_func(*leaves, causal=causal, deterministic=deterministic)
        grads = torch.autograd.grad(out, leaves, grad)
        if first is None:
            first = [g.clone() for g in grads]
            continue
        for name, a, b in zip(("dq", "dk", "dv"), first, grads):
            if not torch.equal(a, b):
                differ = int((a != b).sum())
                raise AssertionError(f"{name} differs between run 0 and run {run} in {differ} of {a.numel()} "
                                     f"elements (max {float((a.float() - b.float()).abs().max()):.3e})")
    return f"d={dim} {str(dtype)[6:]} causal={causal}: matches the reference, {repeats} runs bitwise equal"


def _probe_variants(dim: int) -> list[blocks.Blocks]:
    """The table's shape with one property changed at a time: rows per step, stages, keys, warps."""
    return [blocks.Blocks(*shape) for shape in ((32, 128, 4, 2), (32, 128, 4, 1), (64, 128, 4, 2), (64, 128, 4, 1),
                                                (32, 64, 4, 2), (32, 128, 8, 2))]


def dump_compiled(kernel, folder: str) -> None:
    """Write the TTGIR and PTX of every compiled variant of a triton kernel (to read the pipelining)."""
    os.makedirs(folder, exist_ok=True)
    for device_cache in getattr(kernel, "device_caches", {}).values():
        compiled = device_cache[0] if isinstance(device_cache, tuple) else device_cache
        for n, variant in enumerate(compiled.values()):
            meta = getattr(variant, "metadata", None)
            tag = f"{kernel.__name__}-{n}-w{getattr(meta, 'num_warps', '')}-s{getattr(meta, 'num_stages', '')}"
            for kind in ("ttgir", "ptx"):
                if kind in getattr(variant, "asm", {}):
                    with open(os.path.join(folder, f"{tag}.{kind}"), "w") as f:
                        f.write(str(variant.asm[kind]))


def time_backward(dims, shapes, warmup: int = 3, iters: int = 10) -> None:
    """Forward + backward milliseconds per dK/dV block shape (bf16, B=4, Hq=Hkv=16, L=4096), side by side."""
    import mfa_hf

    for dim, causal in itertools.product(dims, (False, True)):
        q, k, v = (torch.randn(4, 4096, 16, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn_like(q)
        cells = []
        for shape in shapes:
            with dkdv_blocks(dim, blocks.Blocks(*shape)):
                for n in range(warmup + iters):
                    if n == warmup:
                        torch.cuda.synchronize()
                        start = time.perf_counter()
                    torch.autograd.grad(mfa_hf.flash_attn_func(q, k, v, causal=causal), (q, k, v), grad)
                torch.cuda.synchronize()
            cells.append(f"{shape}: {(time.perf_counter() - start) / iters * 1e3:.2f} ms")
        print(f"time d={dim} causal={causal} " + " | ".join(cells), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", type=int, nargs="*", default=None,
                        help="also try other dK/dV blocks at these padded head dims (default 32 64)")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--time", type=int, nargs="*", default=None,
                        help="time forward+backward at these head dims for each candidate dK/dV shape")
    parser.add_argument("--dump", default="", help="write the dK/dV kernel's TTGIR and PTX variants here")
    args = parser.parse_args(argv)
    os.environ["MFA_BACKEND"] = "triton"
    failures = 0
    if args.time is not None:
        time_backward(args.time or [32, 64], [(64, 128, 4, 2), (64, 128, 8, 2), (64, 64, 4, 2), (32, 128, 4, 1),
                                             (32, 128, 4, 2), (128, 128, 8, 2)])
        return 0
    print(f"torch {torch.__version__}, triton {__import__('triton').__version__}, {torch.cuda.get_device_name()}")
    for dim, dtype, causal, seqlen in table_configurations():
        kv = blocks.backward_kv_blocks(dim, dtype, causal, "cuda", seqlen + 6)
        q = blocks.backward_q_blocks(dim, dtype, causal, "cuda", seqlen + 6)
        failures += _report(f"d={dim} {str(dtype)[6:]} causal={causal} N={seqlen} table kv={tuple(vars(kv).values())} "
                            f"q={tuple(vars(q).values())}",
                            lambda: check(dim, dtype, causal, args.repeats, seqlen))
    for dim in ([] if args.probe is None else (args.probe or [32, 64])):
        for chosen in _probe_variants(dim):
            for dtype, causal in itertools.product((torch.bfloat16,), (False, True)):
                with dkdv_blocks(dim, chosen):
                    failures += _report(f"d={dim} {str(dtype)[6:]} causal={causal} probe "
                                        f"kv={tuple(vars(chosen).values())}",
                                        lambda: check(dim, dtype, causal, args.repeats))
    if args.dump:
        from mfa_hf.kernels.triton import backward_kernel as backward
        dump_compiled(backward.attention_backward_kv_kernel, args.dump)
    print(f"{failures} failing configurations")
    return 1 if failures else 0


def _report(label: str, run) -> int:
    start = time.perf_counter()
    try:
        line = run()
    except AssertionError as error:
        print(f"FAIL {label}: {str(error).splitlines()[0]}", flush=True)
        return 1
    print(f"ok   {label} {line} ({time.perf_counter() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
