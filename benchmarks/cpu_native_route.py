"""flash_attn_func on the CPU native route (torch's fused SDPA kernel) against SDPA itself, interleaved.

    python benchmarks/cpu_native_route.py --rounds 30

Plain problems ((B, S, H, D) inputs, causal or not, no mask) route to torch's own fused CPU kernel, so the
difference between the two is our share: validation, the memo key, the transposes and the check that q is
finite (the kernel departs from the reference on NaN/inf query rows). `earlier restore` runs the same route
with the row-wise restore the route used before (isnan, any, masked_fill on every call), for comparison in the
same run. Each round calls every variant once in turn; the table gives the median µs per call and its ratio.
"""

from __future__ import annotations

import argparse

import torch

import mfa_hf
from interleaved import interleaved_seconds, print_header, summary  # benchmarks/interleaved.py, beside this file
from mfa_hf import native

SHAPES = ((1, 24, 2, 16), (1, 128, 8, 64), (1, 1024, 8, 64), (2, 2048, 8, 64))


def _earlier_restore(q, k, v, mask, is_causal, scale, out, readable=None):
    return out.masked_fill(q.isnan().any(-1, keepdim=True), float("nan"))


def variants(shape: tuple, causal: bool) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape) for _ in range(3))
    heads_first = [t.transpose(1, 2) for t in (q, k, v)]
    current = native._nonfinite_rows_restored

    def earlier():
        native._nonfinite_rows_restored = _earlier_restore
        try:
            return mfa_hf.flash_attn_func(q, k, v, causal=causal)
        finally:
            native._nonfinite_rows_restored = current

    return {"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(*heads_first, is_causal=causal),
            "flash_attn_func": lambda: mfa_hf.flash_attn_func(q, k, v, causal=causal),
            "earlier restore": earlier}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    print_header("flash_attn_func (CPU native route) vs SDPA", args.rounds,
                 ("B, S, H, D", "causal", "variant", "median us", "x sdpa (above 1: ours faster)"))
    for shape in SHAPES:
        for causal in (False, True):
            repeat = max(1, 20000 // (shape[1] * shape[2]))  # calls per sample: µs-scale calls timed in batches
            # Two warm-up calls: the second plain call of a kind makes its replay.
            times = interleaved_seconds(variants(shape, causal), args.rounds, repeat, warmup=2)
            for name, median, _, relative in summary(times):
                print(f"| {shape} | {causal} | {name} | {median * 1e6:.1f} | {1 / relative:.2f} |")


if __name__ == "__main__":
    main()
