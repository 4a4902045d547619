"""Backward block shapes for head dim 128, timed side by side with SDPA-flash (issue 19's fwd+bwd target).

    PYTHONPATH=. MFA_BACKEND=triton python benchmarks/triton/backward_sweep.py [--small | --flex]

The dK/dV and dQ kernels are independent, so each table entry is swept with the other fixed at its
current value. Every candidate's gradients are compared with the current configuration's (a
different answer is reported, not timed) and two runs must agree bitwise (the backward has no
atomics: a difference is a race, see blocks.py). Shapes: the cuda suite's (B x N = 16k, 16 heads) and
a GQA one (B = 1, 32 query heads over 8 KV heads), causal and full, bf16.

--flex: against compiled FlexAttention instead (flex_features.py's problems at 8k, where fwd+bwd trails Flex: H100,
session 22, causal 0.88x, window 1024 0.86x), with Flex's own sm90 shapes for d 128 among the candidates
(inductor's template heuristics: dK/dV 64 query rows over 128 keys, dQ 128 rows over 64 keys, 8 warps, 3 stages),
and every dK/dV shape also with its tile as keys x queries (backward.KV_KEYS_AS_ROWS, Flex's orientation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import mfa_hf
from mfa_hf.benchmark.measure import cuda_median_ms
from mfa_hf.kernels.triton import backward, blocks, forward

KV = [blocks.Blocks(*c) for c in ((64, 128, 8, 2), (64, 128, 4, 2), (128, 128, 8, 2), (64, 64, 4, 3),
                                  (128, 64, 8, 2), (64, 128, 8, 3), (128, 128, 8, 1))]
Q = [blocks.Blocks(*c) for c in ((128, 64, 8, 2), (128, 32, 4, 2), (64, 64, 4, 2), (128, 128, 8, 2),
                                 (128, 64, 4, 3), (128, 64, 8, 3))]
SHAPES = {"B4 H16 N4096": (4, 4096, 16, 16), "B1 H32/8 N8192": (1, 8192, 32, 8)}
# --small: the cuda suite's short sequences (B x N = 16k tokens, 16 heads), where the backward trails most, and
# candidates with more, smaller programs (dK/dV keeps block_m >= 64 or one stage: blocks.py's race rule).
SMALL_SHAPES = {"B32 H16 N512": (32, 512, 16, 16), "B16 H16 N1024": (16, 1024, 16, 16), "B8 H16 N2048": (8, 2048, 16, 16)}
SMALL_KV = [blocks.Blocks(*c) for c in ((128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2),
                                        (128, 32, 8, 2), (64, 128, 4, 2))]
FLEX_SHAPES = {"B2 H16 N8192": (2, 8192, 16, 16)}
FLEX_KV = [blocks.Blocks(*c) for c in ((128, 64, 8, 2), (64, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3),
                                       (128, 128, 8, 2))]
FLEX_Q = [blocks.Blocks(*c) for c in ((128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3))]
SMALL_Q = [blocks.Blocks(*c) for c in ((128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 4, 2),
                                       (64, 64, 4, 3), (128, 64, 4, 2))]


def _inputs(batch, n, hq, hkv):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, n, hq, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k, v = (torch.randn(batch, n, hkv, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for _ in range(2))
    return q, k, v, torch.randn(q.shape, device="cuda", dtype=torch.bfloat16, generator=g)


def _grads(q, k, v, grad, causal, left=-1):
    out = mfa_hf.flash_attn_func(q, k, v, causal=causal, window_size=(left, 0) if left >= 0 else (-1, -1))
    return torch.autograd.grad(out, (q, k, v), grad)


def _fwd_bwd_ms(fn):
    return cuda_median_ms(fn, repeats=10, warmup=2)["median_ms"]


def _sdpa_reference(q, k, v, grad, causal, left):
    """(label, ms) of SDPA-flash's fwd+bwd, SDPA's own pick printed beside it."""
    hq, hkv = q.shape[2], k.shape[2]

    def sdpa():
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, enable_gqa=hq != hkv)
        torch.autograd.grad(out, (q, k, v), grad.transpose(1, 2))

    def sdpa_flash():  # SDPA left to itself picks cuDNN on Hopper (torch 2.11): force the flash kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa()
    return f"sdpa-flash (SDPA's default backend {_fwd_bwd_ms(sdpa):.3f} ms)", _fwd_bwd_ms(sdpa_flash)


def _flex_reference(q, k, v, grad, causal, left):
    """(label, ms) of compiled FlexAttention's fwd+bwd on the same causal (windowed) problem."""
    from flex_features import _flex  # beside this script, on the path of `python benchmarks/triton/...`

    flex = _flex(q.shape[1], left, 0.0)

    def step():
        torch.autograd.grad(flex(q, k, v), (q, k, v), grad)
    return "flex", _fwd_bwd_ms(step)


PROBLEMS = (("full", False, -1), ("causal", True, -1))
FLEX_PROBLEMS = (("causal", True, -1), ("window 1024", True, 1024))


def sweep(shapes=SHAPES, kv_candidates=KV, q_candidates=Q, problems=PROBLEMS, reference=_sdpa_reference,
          kv_orientations=(False,)):
    """kv_orientations: backward.KV_KEYS_AS_ROWS values each dK/dV candidate is timed with."""
    for name, (batch, n, hq, hkv) in shapes.items():
        q, k, v, grad = _inputs(batch, n, hq, hkv)
        for problem, causal, left in problems:
            label, reference_ms = reference(q, k, v, grad, causal, left)
            base = _grads(q, k, v, grad, causal, left)
            print(f"{name} {problem}: {label} fwd+bwd {reference_ms:.3f} ms", flush=True)
            kv_runs = [(cfg, keys_as_rows) for cfg in kv_candidates for keys_as_rows in kv_orientations]
            for table, candidates in ((blocks._BACKWARD_KV, kv_runs), (blocks._BACKWARD_Q,
                                                                       [(cfg, False) for cfg in q_candidates])):
                saved = table[128]
                for cfg, keys_as_rows in candidates:
                    kernel = ("dKdV keys x queries" if keys_as_rows else "dKdV") if table is blocks._BACKWARD_KV \
                        else "dQ"
                    table[128] = cfg
                    backward.KV_KEYS_AS_ROWS = keys_as_rows
                    forward.forget_plans()  # launch plans hold the block choice and the orientation
                    try:
                        first, second = _grads(q, k, v, grad, causal, left), _grads(q, k, v, grad, causal, left)
                        race = any(not torch.equal(a, b) for a, b in zip(first, second))
                        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(first, base))
                        ms = _fwd_bwd_ms(lambda: _grads(q, k, v, grad, causal, left))
                        verdict = "RACE" if race else ("DIFFERS" if diff > 0.05 else "ok")
                        print(f"  {kernel} {tuple(cfg.__dict__.values())}: {ms:.3f} ms, {label.split()[0]}/ours "
                              f"{reference_ms / ms:.3f}, max|d - current| {diff:.2e} {verdict}", flush=True)
                    except Exception as error:  # noqa: BLE001 - a config that does not compile is reported
                        print(f"  {kernel} {tuple(cfg.__dict__.values())}: failed {type(error).__name__}: "
                              f"{str(error)[:120]}", flush=True)
                    finally:
                        table[128] = saved
                        backward.KV_KEYS_AS_ROWS = False
                        forward.forget_plans()


if __name__ == "__main__":
    import sys

    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    if "--small" in sys.argv:
        sweep(SMALL_SHAPES, SMALL_KV, SMALL_Q)
    elif "--flex" in sys.argv:
        sweep(FLEX_SHAPES, FLEX_KV, FLEX_Q, FLEX_PROBLEMS, _flex_reference, kv_orientations=(False, True))
    else:
        sweep()
