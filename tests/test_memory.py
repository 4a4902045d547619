"""O(N) memory: forward + backward at a length whose score matrix alone would need over 8 GiB.

Runs in a fresh subprocess and reads its peak resident set size, which an O(N^2) design (one that
materializes the (Lq, Lk) scores even once) cannot keep below the bound.
"""

import subprocess
import sys

SCRIPT = r"""
import resource, torch, mfa_hf
L = {length}
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, L, 1, 16, generator=g).requires_grad_() for _ in range(3))
out = mfa_hf.flash_attn_func(q, k, v, causal=True)
out.sum().backward()
assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

LENGTH = 47_000
SCORE_BYTES = LENGTH * LENGTH * 4  # one fp32 score matrix for one head: 8.2 GiB
BOUND = 1.5 * 2**30  # the interpreter and torch take ~0.25 GiB; inputs and grads are a few MiB


def test_forward_backward_memory_is_linear():
    assert SCORE_BYTES > 8 * 2**30
    result = subprocess.run([sys.executable, "-c", SCRIPT.format(length=LENGTH)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.split()[-1])
    assert peak < BOUND, f"peak RSS {peak / 2**30:.2f} GiB; the scores alone would be {SCORE_BYTES / 2**30:.1f} GiB"
