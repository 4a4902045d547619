"""O(N) memory: forward + backward at a length whose score matrix alone would need over 8 GiB.

Runs in a fresh subprocess and reads its own peak resident set size (mfa_hf.peak_rss), which an O(N^2) design
(one that materializes the (Lq, Lk) scores even once) cannot keep below the bound. Not ru_maxrss: on Linux
exec keeps the parent's high-water mark, so the child read pytest's peak (1.55 GiB late in a CI run).
"""

import subprocess
import sys

SCRIPT = r"""
import torch, mfa_hf
from mfa_hf.peak_rss import peak_rss_bytes
L = {length}
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, L, 1, 16, generator=g).requires_grad_() for _ in range(3))
out = mfa_hf.flash_attn_func(q, k, v, causal=True)
out.sum().backward()
assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
print(peak_rss_bytes())
"""

LENGTH = 47_000
SCORE_BYTES = LENGTH * LENGTH * 4  # one fp32 score matrix for one head: 8.2 GiB
BOUND = 1.5 * 2**30  # the interpreter and torch take ~0.25 GiB; inputs and grads are a few MiB


def _child_peak(script: str) -> int:
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


def test_forward_backward_memory_is_linear():
    assert SCORE_BYTES > 8 * 2**30
    peak = _child_peak(SCRIPT.format(length=LENGTH))
    assert peak < BOUND, f"peak RSS {peak / 2**30:.2f} GiB; the scores alone would be {SCORE_BYTES / 2**30:.1f} GiB"


def test_a_child_reads_its_own_peak_not_its_parents():
    """The measurement itself: a parent holding 1 GiB starts a child that holds 64 MiB at most."""
    held = bytearray(2**30)
    held[::4096] = b"\1" * len(range(0, len(held), 4096))  # touched, so resident
    script = ("from mfa_hf.peak_rss import peak_rss_bytes\n"
              "grown = bytearray(64 * 2**20); grown[::4096] = b'\\1' * (len(grown) // 4096)\n"
              "print(peak_rss_bytes())")
    peak = _child_peak(script)
    del held
    assert 64 * 2**20 < peak < 512 * 2**20, f"the child read {peak / 2**20:.0f} MiB"
