"""Every tensor argument in unusual layouts and dtypes, against the float64 reference (issue 16).

DESIGN.md's kernel-boundary rule: the tensor bound to a kernel is the tensor whose strides are passed,
and tests give *every* tensor argument unusual layouts, not only q/k/v. This package builds such
arguments and checks one call of the public API (`flash_attn_func`, `flash_attn_varlen_func`,
`flash_attn_with_kvcache`) against kernels/reference.py with the tolerance rule of mfa_hf/testing.py.

- layouts.py: `Layout` and `place`: an argument's values inside a garbage-filled buffer (transposed,
  sliced, offset, expanded), which must be bitwise unchanged after the call (only a KV cache's appended
  rows change).
- specs.py: `DenseSpec`, `VarlenSpec`, `KVCacheSpec` (and the argument specs) describe one call; their
  repr rebuilds them, so each failure prints a one-line reproduction (`repro_command`).
- values.py: the seeded input values. checks.py: comparing with the reference, noise allowances.
- run.py: `run_spec(spec)` makes the inputs, calls the API with the backend MFA_BACKEND forces, and
  returns a list of failures (empty: every output, LSE, gradient and side effect matched).
- isolation.py: `IsolatedRunner` runs specs in a worker process per backend, with TRITON_INTERPRET /
  MFA_METAL_EMULATOR set before mfa_hf is imported; a kernel that aborts the process fails one case.
- targets.py: `targeted_cases()`, one case per (argument, layout, dtype) and the semantic cases;
  strategies.py: hypothesis strategies (`dense_specs`, `varlen_specs`, `kvcache_specs`) draw
  everything at once; explore.py: `python -m mfa_hf.testing_layouts explore BACKEND KIND [N] [SEED]`.

Semantics checked through the reference (kernels/reference.py): a NaN in q reaches its output row (as
NaN) unless the row sees no key; an additive mask is added exactly (a row masked by finfo.min
everywhere averages V: the scores vanish next to the mask value); a row with no visible key (bool
mask, -inf, causal) gives 0 and LSE -inf; with Lk = 0 the LSE is the sink, so dsinks = sum of dLSE.

`from mfa_hf.testing_layouts import *` is what the printed repro commands run: __all__ names the specs
they rebuild and run_spec, and what tests/test_fuzz_layouts.py imports. The strategy `layouts` and
`explore` stay in their modules: re-exported here they would hide the submodules of the same names.
"""

from .checks import compare, compare_lse, noise_bounds
from .isolation import IsolatedRunner, prepare_process, worker_environment, worker_main
from .layouts import (
    CONTIGUOUS,
    FLOAT_NAMES,
    INT_NAMES,
    KERNEL_DTYPES,
    Layout,
    Placed,
    SpecNotApplicable,
    compact_shape,
    dtype_of,
    named_layout,
    place,
)
from .run import current_backend, default_device, run_spec
from .specs import DenseSpec, IndexSpec, KVCacheSpec, MaskSpec, VarlenSpec, VectorSpec, describe, repro_command
from .strategies import STRATEGIES, dense_specs, kvcache_specs, varlen_specs
from .targets import CORE, Target, targeted_cases

__all__ = [
    "CONTIGUOUS", "CORE", "FLOAT_NAMES", "INT_NAMES", "KERNEL_DTYPES", "STRATEGIES",
    "DenseSpec", "IndexSpec", "IsolatedRunner", "KVCacheSpec", "Layout", "MaskSpec", "Placed", "SpecNotApplicable",
    "Target", "VarlenSpec", "VectorSpec",
    "compact_shape", "compare", "compare_lse", "current_backend", "default_device", "dense_specs", "describe",
    "dtype_of", "kvcache_specs", "named_layout", "noise_bounds", "place",
    "prepare_process", "repro_command", "run_spec", "targeted_cases", "varlen_specs", "worker_environment",
    "worker_main",
]
