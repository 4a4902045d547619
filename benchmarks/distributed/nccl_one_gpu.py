"""What one lent GPU can say about context parallelism over NCCL (issue 22): the NCCL code path with one rank,
and the per-rank kernel times of a ring, projected to P ranks.

    PYTHONPATH=. python benchmarks/distributed/nccl_one_gpu.py [--out DIR]

Shapes of issue 22: B = 1, Hq = 32, Hkv = 8, D = 128, bf16, causal and full. Rows:
1. `nccl x1`: ring_flash_attn_func and ulysses_flash_attn_func on a one-rank NCCL group against
   flash_attn_func on the same tensors (the machinery's overhead where no transfer happens), and SDPA
   (flash, GQA) for scale; results compared.
2. `ring step`: the attention a rank computes per ring step at P ranks (N/P queries against N/P keys with
   the LSE; causal: the diagonal block, and zig-zag's half blocks), and the per-rank compute that P steps
   add up to, as a projected efficiency against one GPU: T1 / (P x T_rank). Communication is not measured
   (one GPU): the K/V bytes a step sends are given, with the time they take at an assumed link rate.
Forward and forward+backward; CUDA-event medians.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mfa_hf
from mfa_hf.benchmark.measure import cuda_median_ms
from mfa_hf.distributed import ring_flash_attn_func, ulysses_flash_attn_func

HQ, HKV, DIM = 32, 8, 128
LINK_GBPS = 450.0  # assumed one-way NVLink rate per GPU on an H200 node (GB/s), for the transfer column only


def _tensors(n: int, m: int, grad: bool):
    q = torch.randn(1, n, HQ, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
    k, v = (torch.randn(1, m, HKV, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=grad) for _ in range(2))
    return q, k, v


def _ms(fn, q, k, v, backward: bool, repeats: int) -> float:
    if not backward:
        with torch.no_grad():
            return cuda_median_ms(lambda: fn(q, k, v), repeats=repeats, warmup=1)["median_ms"]
    grad = torch.randn(q.shape[:-1] + (DIM,), device="cuda", dtype=torch.bfloat16)

    def step():
        torch.autograd.grad(fn(q, k, v), (q, k, v), grad)
    return cuda_median_ms(step, repeats=repeats, warmup=1)["median_ms"]


def one_rank(rows: list) -> None:
    for n in (32768, 65536):
        for causal in (False, True):
            q, k, v = _tensors(n, n, True)
            impls = {
                "flash_attn_func": lambda q, k, v: mfa_hf.flash_attn_func(q, k, v, causal=causal),
                "ring (nccl x1)": lambda q, k, v: ring_flash_attn_func(q, k, v, causal=causal),
                "ulysses (nccl x1)": lambda q, k, v: ulysses_flash_attn_func(q, k, v, causal=causal),
                "sdpa flash (gqa)": lambda q, k, v: F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                    enable_gqa=True).transpose(1, 2),
            }
            with torch.no_grad():
                base = impls["flash_attn_func"](q, k, v).float()
                diffs = {name: round((fn(q, k, v).float() - base).abs().max().item(), 5) for name, fn in impls.items()}
            for backward in (False, True):
                times = {name: round(_ms(fn, q, k, v, backward, 5), 3) for name, fn in impls.items()}
                row = {"what": "nccl x1", "n": n, "causal": causal, "pass": "fwd+bwd" if backward else "fwd",
                       "ms": times, "max_abs_diff_vs_flash_attn_func": diffs}
                print(row, flush=True)
                rows.append(row)
            del q, k, v


def ring_steps(rows: list) -> None:
    for n_total in (65536, 131072):
        for causal in (False, True):
            for backward in (False, True):
                single = _block_ms(n_total, n_total, causal, backward)
                for ranks in (2, 4, 8):
                    shard = n_total // ranks
                    full = _block_ms(shard, shard, False, backward)
                    if causal:  # zig-zag: the diagonal (two causal half-blocks) + P-1 steps of half a block
                        diagonal = _block_ms(shard, shard, True, backward)
                        half = _block_ms(shard, shard // 2, False, backward)
                        per_rank = diagonal + (ranks - 1) * half
                    else:
                        per_rank = ranks * full
                    kv_bytes = 2 * shard * HKV * DIM * 2
                    row = {"what": "ring step", "n_total": n_total, "ranks": ranks, "causal": causal,
                           "pass": "fwd+bwd" if backward else "fwd", "one_gpu_ms": round(single, 2),
                           "per_rank_compute_ms": round(per_rank, 2),
                           "projected_efficiency": round(single / (ranks * per_rank), 3),
                           "kv_bytes_per_step_MB": round(kv_bytes / 2 ** 20, 1),
                           "step_transfer_ms_at_link": round(kv_bytes / (LINK_GBPS * 1e9) * 1e3, 3),
                           "step_compute_ms": round(per_rank / ranks, 3)}
                    print(row, flush=True)
                    rows.append(row)


def _block_ms(n: int, m: int, causal: bool, backward: bool) -> float:
    q, k, v = _tensors(n, m, backward)
    repeats = 3 if n * m > 2 ** 34 else 5
    return _ms(lambda q, k, v: mfa_hf.flash_attn_func(q, k, v, causal=causal, return_lse=True)[0], q, k, v,
               backward, repeats)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    parser.add_argument("--skip-steps", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "nccl", torch.cuda.nccl.version(),
          "MFA_BACKEND", os.environ.get("MFA_BACKEND"), flush=True)
    results: list = []
    one_rank(results)
    if not args.skip_steps:
        ring_steps(results)
    dist.destroy_process_group()
    if args.out:
        with open(os.path.join(args.out, "nccl_one_gpu.json"), "w") as f:
            json.dump(results, f, indent=1)
