"""Test helper for the native routes (mfa_hf/routes.py), shared by the CPU tests (tests/test_native_routes.py) and
the cuda ones (tests/triton/test_native_routes_cuda.py): one call through flash_attn_func, the path that served it
and its reason, the SDPA kernels that ran (profiler), then the output and every input gradient against the float64
reference on the CPU with DESIGN.md's rule, on fresh random inputs."""

from __future__ import annotations

import math

import torch
from torch.profiler import profile

import mfa_hf
from mfa_hf import trace
from mfa_hf.kernels.reference import attention_reference
from mfa_hf.testing import GRADIENT_FACTOR, Case, _to_cpu_leaf, assert_close_to_reference, \
    delta_rounding_effect, make_inputs, reference_of


MATH = "aten::_scaled_dot_product_attention_math"  # SDPA's O(N^2) fallback: a native route must never run it


def default_routing(monkeypatch) -> None:
    """Routing as a user has it: no forced backend, the default gate tables (whatever this machine has cached)."""
    monkeypatch.delenv("MFA_BACKEND", raising=False)
    monkeypatch.setenv("MFA_ROUTE_TABLE", "")


def sdpa_switches() -> tuple:
    """SDPA's backend switches (flash, cuDNN, efficient, math) as they stand: a held call must leave them so."""
    from mfa_hf import native

    return tuple(enabled() for enabled, _ in native._SWITCHES.values())


def run_routed(case: Case, inputs: dict, return_lse: bool = False):
    return mfa_hf.flash_attn_func(inputs["q"], inputs["k"], inputs["v"], attn_mask=inputs["attn_mask"],
                                  alibi_slopes=inputs["alibi_slopes"], sinks=inputs["sinks"],
                                  return_lse=return_lse, dropout_p=case.dropout_p, **case.options())


def check_route(case: Case, path: str, reason_part: str = "", ran: tuple = (), not_ran: tuple = (),
                grads: bool = True, seed: int = 0, device: str = "cpu") -> None:
    """The call took `path` (its reason holding reason_part), every op of `ran` ran and none of `not_ran`, and
    the output and gradients hold the tolerance rule against the float64 reference."""
    inputs = make_inputs(case, device=device, seed=seed, requires_grad=grads)
    if case.mask == "additive" and inputs["attn_mask"] is not None:
        inputs["attn_mask"] = inputs["attn_mask"].detach()  # a mask needing grad is its own class
    names = [n for n in ("q", "k", "v", "sinks") if inputs[n] is not None and inputs[n].requires_grad]
    grad_out = None
    with trace.capture_routes() as decided, profile() as prof:
        out = run_routed(case, inputs)
        if grads:
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out.dtype)
            ours = torch.autograd.grad(out, [inputs[n] for n in names], grad_out.to(out.device))
    ((served, reason),) = decided.keys()
    assert served == path and reason_part in reason, (served, reason)
    ops = {event.key for event in prof.key_averages()}
    assert set(ran) <= ops and not set(not_ran) & ops, sorted(o for o in ops if "scaled_dot" in o)
    cpu_inputs = {name: _to_cpu_leaf(value) for name, value in inputs.items()}
    ref, ref_lse, ref_args = reference_of(case, cpu_inputs, upcast=True)
    base, _, base_args = reference_of(case, cpu_inputs, upcast=False)
    assert_close_to_reference(out.detach().cpu(), ref, base, name="out")
    if not grads:
        return
    want = torch.autograd.grad(ref, [ref_args[n] for n in names], grad_out.to(torch.float64), retain_graph=True)
    baseline = torch.autograd.grad(base, [base_args[n] for n in names], grad_out)
    effect = delta_rounding_effect(out.detach().cpu(), ref, ref_lse, [ref_args[n] for n in names], grad_out, names,
                                   case, cpu_inputs)
    for name, g, g_ref, g_base, extra in zip(names, ours, want, baseline, effect):
        assert_close_to_reference(g.cpu(), g_ref, g_base, GRADIENT_FACTOR, f"d{name}", case.dtype, extra)


def nonfinite_query_case(mask_kind: str, rows: int, heads: tuple, compiled: bool, device: str = "cpu",
                         dtype: torch.dtype = torch.float32):
    """q with a NaN, a +inf and a -inf row (and finite ones), a mask hiding every key of some rows; one row of the
    first batch holds -inf where every key is positive, so all its scores are -inf (the reference gives it 0).
    Returns q, k, v, the mask and the call (compiled with fullgraph when asked), the tensors on `device`."""
    g = torch.Generator().manual_seed(rows * 7 + heads[0])
    q = torch.randn(2, rows, heads[0], 16, generator=g)
    k, v = (torch.randn(2, 12, heads[1], 16, generator=g) for _ in range(2))
    for b, value in enumerate((float("nan"), float("inf"))):
        q[b, rows - 1, 0, 3] = value
    q[1, 0, heads[0] - 1, 5] = -float("inf")
    if not compiled:  # the device-only form (compiled) differs from the reference on this row alone
        q[0, 0, heads[0] - 1, 7] = -float("inf")
        k[0, :, :, 7] = k[0, :, :, 7].abs() + 0.1
    mask = None
    if mask_kind != "none":
        seen = torch.rand(2, 1, rows, 12, generator=g) > 0.3
        seen[:, :, 0] = False  # row 0 hides every key: the reference gives 0 whatever q holds
        seen[1, :, rows - 1] = False  # the +inf row too
        seen[0, :, rows - 1] = rows == 1 or bool(seen[0, :, rows - 1].any())  # the NaN row sees a key
        mask = seen if mask_kind == "bool" else torch.zeros(seen.shape).masked_fill(~seen, -math.inf)
        mask = mask.to(device)
    q, k, v = (t.to(device, dtype) for t in (q, k, v))
    call = lambda q, k, v: mfa_hf.flash_attn_func(q, k, v, attn_mask=mask)  # noqa: E731
    if compiled:
        call = torch.compile(call, fullgraph=True, backend="eager")
    return q, k, v, mask, call


def infinite_score_case(corrupt: str, mask_kind: str, dtype: torch.dtype, rows: int, heads_kv: int, dim: int,
                        device: str = "cpu"):
    """q (2, rows, 4, dim) and k/v (2, 16, heads_kv, dim) with one non-finite element ("k+inf", "k-inf", "k-nan",
    "v+inf") or one in an additive mask ("mask+inf", "mask-nan"), which gives row 0 of batch 0 an infinite (or
    NaN) score; mask_kind "none", "bool" or "additive" (a row of the other batch hides every key). Returns q, k, v
    and the mask, on `device`."""
    g = torch.Generator().manual_seed(rows + len(corrupt))
    q = torch.randn(2, rows, 4, dim, generator=g)
    k, v = (torch.randn(2, 16, heads_kv, dim, generator=g) for _ in range(2))
    mask = None
    if mask_kind != "none":
        seen = torch.rand(2, 1, rows, 16, generator=g) > 0.3
        seen[:, :, 0, 5] = True  # the corrupted key is visible to row 0 ...
        seen[1, :, rows - 1] = False  # ... and one row of the other batch hides every key
        mask = seen if mask_kind == "bool" else torch.zeros(seen.shape).masked_fill(~seen, -math.inf)
    where = (0, 5, heads_kv - 1, 3)  # batch 0, key 5, the last KV head, element 3
    value = {"k+inf": math.inf, "k-inf": -math.inf, "k-nan": math.nan, "v+inf": math.inf}.get(corrupt)
    if corrupt.startswith("k"):
        k[where] = value
        if not math.isnan(value):  # row 0 scores +inf (a NaN row); the other rows' signs are random
            q[0, 0, :, 3] = q[0, 0, :, 3].abs() * math.copysign(1.0, value)
    elif corrupt.startswith("v"):
        v[where] = value
    else:
        mask[0, 0, 0, 5] = math.inf if corrupt == "mask+inf" else math.nan
    q, k, v = (t.to(device, dtype) for t in (q, k, v))
    if mask is not None:
        mask = mask.to(device, mask.dtype if mask.dtype == torch.bool else dtype)
    return q, k, v, mask


def assert_nonfinite_rows_match(out, q, k, v, mask=None) -> torch.Tensor:
    """out has NaN exactly where the float64 reference has, and its other rows hold the tolerance rule (all
    compared on the CPU); returns the reference for the caller's own checks."""
    q, k, v, out = (t.cpu() for t in (q, k, v, out))
    mask = None if mask is None else mask.cpu()
    ref, _ = attention_reference(q.double(), k.double(), v.double(), attn_mask=mask)
    assert torch.equal(out.isnan(), ref.isnan()), (out.isnan().any(-1), ref.isnan().any(-1))
    keep = ~ref.isnan()
    base, _ = attention_reference(q, k, v, attn_mask=mask, upcast=False)
    assert_close_to_reference(out[keep], ref[keep], base[keep])
    return ref
