"""--suite standard: mps-flash-attn's standard grid through run_suite (ours vs SDPA, in this process).

Its grid: sequences 512-4096, float16 and bfloat16, batch 1 and 4, head dims 64 and 128, causal and
sliding-window rows. On CPU without --full-size, run_suite's small CPU defaults instead (programmatic.DEFAULTS):
the full grid in float16 takes hours there. --seq-lengths / --dtypes / --backward override it.
"""

from __future__ import annotations

from .programmatic import run_suite

GRID = dict(seq_lengths=[512, 1024, 2048, 4096], dtypes=["float16", "bfloat16"], batch_sizes=[1, 4],
            head_dims=[64, 128])


def run(device: str, small: bool, log, seq_lengths=None, dtypes=None, backward: bool = False) -> list[dict]:
    grid = {} if small and device.startswith("cpu") else GRID
    log(f"# standard grid: {grid or 'run_suite CPU defaults'}")
    return run_suite(seq_lengths=seq_lengths or grid.get("seq_lengths"), dtypes=dtypes or grid.get("dtypes"),
                     batch_sizes=grid.get("batch_sizes"), head_dims=grid.get("head_dims"), include_window=True,
                     include_backward=backward, verbose=True, device=device, as_frame=False)
