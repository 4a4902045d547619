"""The gate table: per device, the platform's fused attention kernels and the problems they serve.

Only limits live here (dtypes, head dims, query lengths, masks verified exact, GQA, gradients); the
semantic rules are routes.py's and no table can widen them. Sources for the defaults:

- cpu: torch's fused CPU SDPA (`_scaled_dot_product_flash_attention_for_cpu`, forward and backward):
  fp32/fp16/bf16, any head dim, bool and additive masks, GQA, fully masked rows give 0; fp16 forward only (its
  fp16 backward: 7-9x slower than ours on a 2-core x86 VM, dV error 1.9x PyTorch math's where ours is 1.0x)
  (tests/test_native_routes.py checks each class against the float64 reference and that the fused op
  ran, not the math one). Query rows holding NaN or inf get the reference's result from native.py.
- cuda: SDPA's flash/cuDNN kernels: fp16/bf16, head dim <= 256 and a multiple of 8, no mask (the
  efficient kernel would take masks; its fully-masked rows are not verified), GQA, backward fused; decode-sized
  queries held to the flash kernel (cuDNN builds a graph per key length, i.e. per generated token).
- mps (torch >= 2.13, `_scaled_dot_product_attention_math_for_mps`, ../shared/research/anchors-2026-12.md
  section 1): the prefill flash kernel (Lq > 8, D in {32, 64, 72, 80, 96, 128, 256}) and the vector
  decode kernel (Lq <= 8, D in {64, 96, 128, 256}). Conservative until a Mac has run them: no masks
  (masks past 100K tokens are an open torch bug), no GQA for decode (the two-pass GQA out-of-bounds
  read is open), no gradients (training falls back to O(N^2) math), Lk <= 32768.

A per-machine table (`mfa-hf doctor --write-route-table` on a Mac, opt-in; `default_path()`) replaces
the default gates of its device; MFA_ROUTE_TABLE names another file, or "" to ignore any.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

INF = 1 << 62
MASK_KINDS = ("none", "bool", "additive")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class NativeGate:
    path: str  # what MFA_TRACE names
    dtypes: tuple
    head_dims: tuple | None = None  # None: any head dim within max_head_dim / head_dim_multiple
    max_head_dim: int = 256
    head_dim_multiple: int = 1
    min_q: int = 1
    max_q: int = INF
    max_k: int = INF
    masks: tuple = ("none",)
    gqa: bool = True
    grad: bool = True
    grad_reason: str = "its backward is not fused"  # the route's reason when grad is False
    # The kernel departs from the reference on query rows holding NaN or inf (0 for a NaN row that sees keys,
    # NaN for an inf row its bool mask hides); native.py gives those rows the reference's result.
    zeroes_nan_query_rows: bool = False
    # The kernel departs from the reference on rows with an infinite score (a non-finite key, a +inf in an
    # additive mask): torch's CPU kernel returns 0 for a row with a visible +inf score in float16 and bfloat16
    # (the reference: NaN), and NaN in every dtype for a row whose bool mask hides a key of +inf score (it adds the
    # mask; the reference ignores the key). native.py gives those rows the reference's result.
    departs_on_infinite_scores: bool = False
    # One query row with GQA: pass the G query heads of each KV head as G rows of one head instead of
    # asking the kernel for GQA (exact: one row sees every key of its slice, so the rows are independent).
    # Measured faster with torch's CPU kernel where the KV heads fill its threads (one thread: 1.1x at 9/3 heads,
    # 1.2-2x at 32/8); native.stacking_pays decides per call from the thread count.
    stacks_query_groups: bool = False
    # The SDPA backend the call is held to (SDPA_BACKENDS), None: SDPA's own choice. On cuda, torch 2.11 picks
    # cuDNN for one-row decode, and cuDNN builds a graph for every new key length: each generated token paid
    # about 42 ms on an H100 (llama-1b, 8k: 52.5 ms a step on first visit, 11.1 on the second; 10.6 with the
    # flash kernel, which needs no per-shape build). Results: benchmarks/README.md (session 13).
    sdpa_backend: str | None = None


SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")


_HALF = (torch.float16, torch.bfloat16)
DECODE_ROWS = 16  # query rows up to this are a decode step (integrations/transformers/decode.py DECODE_MAX_Q)
DEFAULT = {
    "cpu": (NativeGate("sdpa-cpu-flash", (torch.bfloat16, torch.float32), max_head_dim=1 << 30, masks=MASK_KINDS,
                       zeroes_nan_query_rows=True, departs_on_infinite_scores=True, stacks_query_groups=True),
            NativeGate("sdpa-cpu-flash", (torch.float16,), max_head_dim=1 << 30, masks=MASK_KINDS,
                       zeroes_nan_query_rows=True, departs_on_infinite_scores=True, stacks_query_groups=True,
                       grad=False,
                       grad_reason="its float16 backward ran 7-9x slower than ours with up to 2x PyTorch math's "
                                   "dV error (x86 without fp16 arithmetic)")),
    # Decode-sized queries (a generated token's step, a speculative block) are held to the flash kernel; longer
    # ones keep SDPA's choice (cuDNN's forward is faster once its graph for the shape exists). The flash kernel
    # keeps a NaN query row NaN, as the reference does (native_route_check.py 1b, H100, session 14), so no row is
    # restored: the restore's three device ops cost ~90 us of host time a decode layer there.
    "cuda": (NativeGate("sdpa-cuda-flash", _HALF, head_dim_multiple=8, max_q=DECODE_ROWS, sdpa_backend="flash"),
             NativeGate("sdpa-cuda-flash", _HALF, head_dim_multiple=8)),
    "mps": (
        NativeGate("sdpa-mps-prefill", _HALF + (torch.float32,), head_dims=(32, 64, 72, 80, 96, 128, 256), min_q=9,
                   max_k=32768, grad=False),
        NativeGate("sdpa-mps-vector-decode", _HALF + (torch.float32,), head_dims=(64, 96, 128, 256), max_q=8,
                   max_k=32768, gqa=False, grad=False),
    ),
}


def default_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mfa_hf" / "native_routes.json"


_loaded: dict = {}


def gates(device_type: str) -> tuple[NativeGate, ...]:
    """The gates for a device: the per-machine table's where it has the device, else the default. The
    file is read once per process (per value of MFA_ROUTE_TABLE): no file system access per call."""
    source = os.environ.get("MFA_ROUTE_TABLE")
    table = _loaded.get(source)
    if table is None:
        table = _loaded[source] = _table(source)
    return table.get(device_type, ())


def _table(source: str | None) -> dict:
    path = default_path() if source is None else (Path(source) if source else None)
    return dict(DEFAULT, **(read(path) if path is not None and path.exists() else {}))


def preload() -> None:
    """Read the table at import: a first call inside torch.compile(fullgraph=True) cannot stat a file (dynamo
    does not trace os.stat). An unreadable file is left for the first call to report, not import."""
    source = os.environ.get("MFA_ROUTE_TABLE")
    try:
        _loaded[source] = _table(source)
    except ValueError:
        pass


def read(path: Path) -> dict:
    """{device: gates} from a table file; a clear error for a malformed one."""
    try:
        raw = json.loads(Path(path).read_text())
        return {device: tuple(_gate(entry) for entry in entries) for device, entries in raw["devices"].items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"native route table {path}: expected {{'devices': {{device: [gate, ...]}}}} as written by "
                         f"`mfa-hf doctor --write-route-table`, got an unreadable file ({error}); delete it or set "
                         "MFA_ROUTE_TABLE=\"\"") from error


def _gate(entry: dict) -> NativeGate:
    entry = dict(entry)
    entry["dtypes"] = tuple(_DTYPES[name] for name in entry["dtypes"])
    entry["masks"] = tuple(entry.get("masks", ("none",)))
    if not set(entry["masks"]) <= set(MASK_KINDS):
        raise ValueError(f"masks: expected a subset of {MASK_KINDS}, got {entry['masks']}")
    if entry.get("sdpa_backend") not in (None,) + SDPA_BACKENDS:
        raise ValueError(f"sdpa_backend: expected one of {SDPA_BACKENDS} or null, got {entry['sdpa_backend']!r}")
    if entry.get("head_dims") is not None:
        entry["head_dims"] = tuple(int(d) for d in entry["head_dims"])
    return NativeGate(**entry)


def write(path: Path, table: dict) -> None:
    """Write {device: gates} as a table file (the per-machine table)."""
    devices = {}
    for device, entries in table.items():
        devices[device] = []
        for gate in entries:
            entry = asdict(gate)
            entry["dtypes"] = [str(d).replace("torch.", "") for d in gate.dtypes]
            entry["masks"] = list(gate.masks)
            devices[device].append(entry)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"devices": devices}, indent=1) + "\n")


def from_measurements(device: str, rows: list[dict]) -> dict:
    """A device's gates from a self-test: each row {path, dtype, head_dim, q_len, exact, native_s, ours_s}.

    A head dim joins a gate only when every row for it was exact (matched the float64 reference within
    the tolerance rule) and native was at least as fast as ours there; everything else stays with the
    default gate's limits. Returns {device: gates}."""
    defaults = {gate.path: gate for gate in DEFAULT.get(device, ())}
    chosen = []
    for path, gate in defaults.items():
        mine = [row for row in rows if row["path"] == path]
        dims = sorted({row["head_dim"] for row in mine})
        good = tuple(d for d in dims if all(r["exact"] and r["native_s"] <= r["ours_s"]
                                            for r in mine if r["head_dim"] == d))
        if gate.head_dims is not None:
            good = tuple(d for d in good if d in gate.head_dims)
        if good:
            chosen.append(NativeGate(**{**asdict(gate), "head_dims": good}))
    return {device: tuple(chosen)}


preload()
