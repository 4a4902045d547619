"""Where the time of one forward+backward goes, kernel by kernel: ours and SDPA-flash, side by side (CUDA).

    MFA_BACKEND=triton PYTHONPATH=. python benchmarks/triton/backward_profile.py

The suite's shapes (B x N = 16384, H x D = 2048, bf16) at the lengths where fwd+bwd trails SDPA-flash. Each
problem runs 3 warm-up steps, then 5 profiled ones; the table lists each kernel's device time per step, so the
torch ops around our kernels (copies, reductions, fills) show beside the kernels themselves, and the host's time
to queue a step tells a host-bound step (queueing takes about the step's time) from gaps on the GPU.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

STEPS = 5
PROBLEMS = ((64, 2048, True), (64, 2048, False), (128, 2048, True), (64, 512, False))  # (D, N, causal)


def _step_fn(impl, dim, n, causal):
    import mfa_hf

    b, h = 16384 // n, 2048 // dim
    q, k, v = (torch.randn(b, n, h, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(b, n, h, dim, device="cuda", dtype=torch.bfloat16)
    if impl == "ours":
        def step():
            torch.autograd.backward(mfa_hf.flash_attn_func(q, k, v, causal=causal), grad)
    else:
        qt, kt, vt, gt = (t.transpose(1, 2) for t in (q, k, v, grad))

        def step():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                torch.autograd.backward(F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal), gt)
    return step


def _print_gaps(prof) -> None:
    """The GPU's idle time inside the profiled steps (between the first kernel's start and the last one's end), and
    the widest gaps with the kernels on either side: a gap after one of our kernels that the host queued late."""
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and e.time_range.end > e.time_range.start), key=lambda e: e.time_range.start)
    if len(kernels) < 2:
        return
    gaps, end = [], kernels[0].time_range.end
    for before, after in zip(kernels, kernels[1:]):
        if after.time_range.start > end:
            gaps.append((after.time_range.start - end, before.name, after.name))
        end = max(end, after.time_range.end)
    idle = sum(g for g, _, _ in gaps) / STEPS / 1e3
    print(f"  GPU idle {idle:.3f} ms per step in {len(gaps)} gaps; widest:")
    for gap, before, after in sorted(gaps, reverse=True)[:4]:
        print(f"    {gap:8.1f} us  after {before[:50]}  before {after[:50]}")


def main() -> None:
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    # One unreported profiled cycle first: the first problem profiled showed a one-off 1.6 ms host gap in one of its
    # steps in two runs of session 18, which no later problem did (a start-up effect, not proven: this cycle tests it).
    step = _step_fn("ours", *PROBLEMS[0])
    step()
    with profile(activities=[ProfilerActivity.CUDA]):
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    for dim, n, causal in PROBLEMS:
        for impl in ("ours", "sdpa_flash"):
            step = _step_fn(impl, dim, n, causal)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                start.record()
                issue = time.perf_counter()
                for _ in range(STEPS):
                    step()
                issue = (time.perf_counter() - issue) * 1e3 / STEPS  # the host's time to queue a step
                end.record()
                torch.cuda.synchronize()
            total = start.elapsed_time(end) / STEPS
            # host-bound when queueing a step takes about as long as the step: the GPU waits for the host
            print(f"\n== D={dim} N={n} causal={causal} {impl}: {total:.3f} ms per fwd+bwd step (profiled), "
                  f"host {issue:.3f} ms to queue one")
            _print_gaps(prof)
            rows = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0),
                          key=lambda e: -e.self_device_time_total)
            for e in rows[:12]:
                print(f"  {e.self_device_time_total / STEPS / 1e3:8.3f} ms  x{e.count // STEPS:<3d} {e.key[:110]}")


if __name__ == "__main__":
    main()
