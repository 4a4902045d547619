"""Small-N forward: our table vs SDPA flash (TFLOP/s), for the README (device_bench's sweep chose the table).

Run on a CUDA machine, from the repository root: PYTHONPATH=. python benchmarks/triton/small_n_check.py
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import mfa_hf


def main() -> None:
    for dim in (128, 64):
        for causal in (False, True):
            for n in (512, 1024, 2048):
                b, h = 16384 // n, 2048 // dim
                q, k, v = (torch.randn(b, n, h, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                flops = 4 * b * h * n * n * dim / (2 if causal else 1)
                ours = do_bench(lambda: mfa_hf.flash_attn_func(q, k, v, causal=causal), return_mode="median")
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    ref = do_bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal), return_mode="median")
                err = (mfa_hf.flash_attn_func(q, k, v, causal=causal).float() - F.scaled_dot_product_attention(
                    qt, kt, vt, is_causal=causal).transpose(1, 2).float()).norm().item()
                print(f"| {dim} | {causal} | {n} | {flops / ours / 1e9:.1f} | {flops / ref / 1e9:.1f} | {ref / ours:.2f} | err {err:.2e}")


if __name__ == "__main__":
    main()
