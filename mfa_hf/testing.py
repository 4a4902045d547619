"""Test helpers shared by every backend's tests: the tolerance rule of DESIGN.md, poisoning, inputs.

The rule (FlashAttention's): a kernel's max error against the float64 reference may be at most
`factor` times the error of plain PyTorch math in the input dtype on the same inputs, plus a floor
of half an ulp of the input dtype at the output's magnitude (and 1e-6 absolute, for float32 whose
PyTorch baseline can be nearly exact). factor is 2 for forward outputs, 3 for gradients and softcap;
gradients may also differ by the error FlashAttention's backward makes by design (see
delta_rounding_effect).
"""

from __future__ import annotations

import torch

FORWARD_FACTOR = 2.0
GRADIENT_FACTOR = 3.0
ABSOLUTE_FLOOR = 1e-6


def allowed_error(reference: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype, factor: float) -> float:
    baseline_error = _max_abs(baseline.to(torch.float64) - reference)
    magnitude = _max_abs(reference)
    half_ulp = 0.5 * torch.finfo(dtype).eps * max(1.0, magnitude)
    return factor * baseline_error + half_ulp + ABSOLUTE_FLOOR


def assert_close_to_reference(
    actual: torch.Tensor,
    reference: torch.Tensor,
    baseline: torch.Tensor,
    factor: float = FORWARD_FACTOR,
    name: str = "output",
    dtype: torch.dtype | None = None,
    algorithmic: float = 0.0,
) -> None:
    """actual: kernel result; reference: float64 result; baseline: PyTorch math in the input dtype.

    dtype: the precision the computation ran in (default actual.dtype); a float32 gradient of a
    float32 parameter (sinks) computed from float16 activations carries float16-sized error.
    algorithmic: an extra allowance for an error the algorithm makes by design (see
    delta_rounding_effect); it is computed, never a guess.
    """
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    actual64 = actual.detach().to(torch.float64)
    same_nan = torch.isnan(actual64) == torch.isnan(reference)
    if not bool(same_nan.all()):
        raise AssertionError(f"{name}: NaN pattern differs from the reference ({int((~same_nan).sum())} elements)")
    finite = torch.isfinite(reference)
    same_inf = (actual64 == reference) | finite | torch.isnan(reference)
    if not bool(same_inf.all()):
        raise AssertionError(f"{name}: infinities differ from the reference")
    error = _max_abs(torch.where(finite, actual64 - reference, 0.0))
    allowed = allowed_error(torch.where(finite, reference, 0.0), torch.where(finite, baseline.to(torch.float64), 0.0),
                            dtype or actual.dtype, factor) + algorithmic
    if not error <= allowed:
        raise AssertionError(f"{name}: max error {error:.3e} exceeds allowed {allowed:.3e} "
                             f"({factor} x PyTorch's own error in {actual.dtype} + floor)")


def _max_abs(x: torch.Tensor) -> float:
    return float(x.detach().abs().max()) if x.numel() else 0.0


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that elements a kernel forgets to write are caught."""
    return t.fill_(float("nan"))


# ----------------------------------------------------------------------------------------------
# The attention test matrix, shared by every backend's tests.

import itertools  # noqa: E402
import math  # noqa: E402
from dataclasses import dataclass  # noqa: E402

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MASK_KINDS = ("none", "bool", "additive")
# (causal, window): full, causal, two-sided window, causal with a left window.
MODES = ((False, (-1, -1)), (True, (-1, -1)), (False, (5, 3)), (True, (6, -1)))
HEADS = ((4, 4), (4, 2), (4, 1))  # mha, gqa, mqa
SHAPES = ((37, 50), (50, 29), (33, 33))  # Lq < Lk, Lq > Lk, square; none a multiple of a tile
HEAD_DIMS = ((40, 40), (59, 59), (33, 24), (8, 16), (111, 111))


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype = torch.float32
    batch: int = 2
    lq: int = 37
    lk: int = 50
    heads_q: int = 4
    heads_kv: int = 2
    dim: int = 40
    dim_v: int = 40
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    sinks: bool = False
    alibi: bool = False
    mask: str = "none"
    strided: bool = False
    dropout_p: float = 0.0

    @property
    def id(self) -> str:
        parts = [str(self.dtype).replace("torch.", ""), f"b{self.batch}", f"q{self.lq}", f"k{self.lk}",
                 f"h{self.heads_q}-{self.heads_kv}", f"d{self.dim}-{self.dim_v}"]
        if self.causal:
            parts.append("causal")
        if self.window != (-1, -1):
            parts.append(f"w{self.window[0]}_{self.window[1]}")
        for flag, name in ((self.softcap > 0, "softcap"), (self.sinks, "sinks"), (self.alibi, "alibi"),
                           (self.mask != "none", f"mask_{self.mask}"), (self.strided, "strided"),
                           (self.dropout_p > 0, f"drop{self.dropout_p}")):
            if flag:
                parts.append(name)
        return "-".join(parts)

    def options(self) -> dict:
        return dict(causal=self.causal, window_size=self.window, softcap=self.softcap)


def core_cases() -> list[Case]:
    """Every dtype x mode x head layout x shape, with features rotated across them (CI default)."""
    features = (
        {}, {"softcap": 3.0}, {"sinks": True}, {"alibi": True}, {"mask": "bool"}, {"mask": "additive"},
        {"strided": True}, {"softcap": 2.0, "sinks": True, "alibi": True, "mask": "additive", "strided": True},
        {"mask": "bool", "sinks": True}, {"alibi": True, "strided": True, "mask": "bool"},
    )
    cases = []
    grid = itertools.product(DTYPES, MODES, HEADS, SHAPES)
    for n, (dtype, (causal, window), (hq, hkv), (lq, lk)) in enumerate(grid):
        dim, dim_v = HEAD_DIMS[n % len(HEAD_DIMS)]
        cases.append(Case(dtype, 2, lq, lk, hq, hkv, dim, dim_v, causal, window, **features[n % len(features)]))
    return cases


def full_cases() -> list[Case]:
    """The whole product (slow): every feature with every other."""
    cases = []
    grid = itertools.product(DTYPES, MODES, HEADS, SHAPES, (0.0, 3.0), (False, True), (False, True),
                             MASK_KINDS, (False, True))
    for n, (dtype, (causal, window), (hq, hkv), (lq, lk), cap, sinks, alibi, mask, strided) in enumerate(grid):
        dim, dim_v = HEAD_DIMS[n % len(HEAD_DIMS)]
        cases.append(Case(dtype, 2, lq, lk, hq, hkv, dim, dim_v, causal, window, cap, sinks, alibi, mask, strided))
    return cases


def _strided(shape: tuple[int, ...], dtype, device, generator) -> torch.Tensor:
    """A (B, S, H, D) tensor laid out as (B, H, S, 2D)[..., ::2]: no dimension is contiguous."""
    b, s, h, d = shape
    base = torch.randn(b, h, s, 2 * d, generator=generator).to(dtype=dtype, device=device)
    return base[..., ::2].transpose(1, 2)


def make_inputs(case: Case, device="cpu", seed: int = 0, requires_grad: bool = False) -> dict:
    """Fresh random inputs for a case; masks include fully masked rows (which must give 0)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        if case.strided:
            return _strided(shape, case.dtype, device, g)
        return torch.randn(*shape, generator=g).to(dtype=case.dtype, device=device)

    b, hq, hkv = case.batch, case.heads_q, case.heads_kv
    inputs = {"q": randn(b, case.lq, hq, case.dim), "k": randn(b, case.lk, hkv, case.dim),
              "v": randn(b, case.lk, hkv, case.dim_v), "attn_mask": None, "alibi_slopes": None, "sinks": None}
    if case.mask != "none":
        keep = torch.rand(b, 1, case.lq, case.lk, generator=g) > 0.3
        keep[:, :, case.lq // 2] = False  # a fully masked row
        if case.mask == "bool":
            inputs["attn_mask"] = keep.to(device)
        else:
            bias = torch.randn(b, hq, case.lq, case.lk, generator=g)
            inputs["attn_mask"] = bias.masked_fill(~keep, -math.inf).to(dtype=case.dtype, device=device)
    if case.alibi:
        inputs["alibi_slopes"] = (torch.rand(b, hq, generator=g) * 0.5).to(device)
    if case.sinks:
        inputs["sinks"] = torch.randn(hq, generator=g).to(device)
    if requires_grad:
        for name in ("q", "k", "v", "sinks"):
            if inputs[name] is not None:
                inputs[name].requires_grad_(True)
        if case.mask == "additive":
            inputs["attn_mask"].requires_grad_(True)
    return inputs


def differentiable(inputs: dict) -> list[str]:
    return [name for name in ("q", "k", "v", "sinks", "attn_mask")
            if inputs[name] is not None and inputs[name].requires_grad]


def reference_of(case: Case, inputs: dict, upcast: bool, seed: torch.Tensor | None = None):
    """The reference (float64 if upcast, else PyTorch math in the input dtype) on (copies of) inputs."""
    from mfa_hf.kernels.reference import attention_reference

    args = {}
    for name, value in inputs.items():
        if value is None:
            args[name] = None
            continue
        if upcast and value.is_floating_point():
            value = value.detach().to(torch.float64)
        else:
            value = value.detach().clone()
        args[name] = value.requires_grad_(inputs[name].requires_grad)
    out, lse = attention_reference(
        args["q"], args["k"], args["v"], attn_mask=args["attn_mask"], alibi_slopes=args["alibi_slopes"],
        sinks=args["sinks"], dropout_p=case.dropout_p, dropout_seed=seed, upcast=upcast, **case.options())
    return out, lse, args


def run_public_api(case: Case, inputs: dict, **extra):
    """The kernel under test through flash_attn_func; returns (out, lse)."""
    import mfa_hf

    return mfa_hf.flash_attn_func(
        inputs["q"], inputs["k"], inputs["v"], attn_mask=inputs["attn_mask"], alibi_slopes=inputs["alibi_slopes"],
        sinks=inputs["sinks"], return_lse=True, **case.options(), **extra)


def functorch_vjp(case: Case, backend: str, run=run_public_api):
    """A vjp for check_against_reference: the gradients by torch.func.vjp of `run` (the forward runs again under
    the transform), asserting that `backend` served its forward and backward there."""
    from mfa_hf import trace

    def vjp(inputs: dict, names: list[str], grad_out: torch.Tensor):
        def out_of(*leaves):
            return run(case, {**inputs, **dict(zip(names, leaves))})[0]

        with trace.capture() as calls:
            _, pullback = torch.func.vjp(out_of, *(inputs[n].detach() for n in names))
            grads = pullback(grad_out)
        served = trace.served_by(calls)
        assert served[(backend, "fwd")] == 1 and served[(backend, "bwd")] == 1, dict(served)
        return grads

    return vjp


def check_against_reference(case: Case, run=run_public_api, backend: str | None = None, seed: int = 0,
                            gradients: bool = True, device="cpu", dropout_seed: torch.Tensor | None = None,
                            vjp=None) -> None:
    """Forward (out, lse) and every input gradient against the float64 reference (DESIGN.md rule).

    run(case, inputs, **dropout_options) -> (out, lse) is the kernel under test; backend, when
    given, must be the one that served the forward (checked through mfa_hf.trace). vjp(inputs, names, grad_out),
    when given, computes the gradients instead of autograd through run's output (a functorch transform's way).
    """
    from mfa_hf import trace

    inputs = make_inputs(case, device=device, seed=seed, requires_grad=gradients)
    extra = {} if case.dropout_p == 0 else {"dropout_p": case.dropout_p, "dropout_seed": dropout_seed}
    with trace.capture() as calls:
        out, lse = run(case, inputs, **extra)
    if backend is not None:
        served = trace.served_by(calls)
        assert served[(backend, "fwd")] == 1, f"expected the {backend} backend to serve, got {dict(served)}"
    cpu_inputs = {name: _to_cpu_leaf(value) for name, value in inputs.items()}
    ref, ref_lse, ref_args = reference_of(case, cpu_inputs, upcast=True, seed=dropout_seed)
    base, base_lse, base_args = reference_of(case, cpu_inputs, upcast=False, seed=dropout_seed)
    factor = GRADIENT_FACTOR if case.softcap > 0 else FORWARD_FACTOR
    assert_close_to_reference(out.cpu(), ref, base, factor, "out")
    assert_close_to_reference(lse.cpu(), ref_lse, base_lse, factor, "lse")
    if not gradients:
        return
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out.dtype)
    names = differentiable(inputs)
    if vjp is None:
        ours = torch.autograd.grad(out, [inputs[n] for n in names], grad.to(out.device))
    else:
        ours = vjp(inputs, names, grad.to(out.device))
    ref_leaves = [ref_args[n] for n in names]
    want = torch.autograd.grad(ref, ref_leaves, grad.to(torch.float64), retain_graph=True)
    effect = delta_rounding_effect(out.cpu(), ref, ref_lse, ref_leaves, grad, names, case, cpu_inputs)
    baseline = torch.autograd.grad(base, [base_args[n] for n in names], grad)
    for name, g_ours, g_ref, g_base, extra in zip(names, ours, want, baseline, effect):
        assert_close_to_reference(g_ours.cpu(), g_ref, g_base, GRADIENT_FACTOR, f"d{name}", case.dtype, extra)


def delta_rounding_effect(out, ref, ref_lse, ref_leaves, grad_out, names=None, case=None, ref_args=None) -> list[float]:
    """How much FlashAttention's backward differs from exact gradients by design, per input.

    The backward takes delta_i = rowsum(dO_i * O_i) from the output O as returned, i.e. rounded to
    the input dtype, where exact math uses the unrounded O. A change e_i in delta_i changes each
    score gradient by -P_ij e_i, which is exactly the gradient of -e_i * LSE_i: so the float64
    reference, differentiated through its LSE, gives that difference for every input.

    Two float32 effects of the same algorithm are bounded from the reference's probabilities (see
    _noise_bounds): the summation-order noise between dp_ij and delta_i, and P recomputed from the
    float32 LSE.
    """
    rounding = (grad_out.to(torch.float64) * (out.to(torch.float64) - ref)).sum(-1)  # (B, Lq, Hq) | (T, H)
    rounding = torch.nan_to_num(rounding, nan=0.0, posinf=0.0, neginf=0.0)
    rounding = rounding.transpose(1, 2) if out.dim() == 4 else rounding.transpose(0, 1)  # the LSE's layout
    grads = torch.autograd.grad(ref_lse, ref_leaves, rounding, allow_unused=True, retain_graph=True)
    effects = [0.0 if g is None else float(torch.nan_to_num(g, nan=0.0).abs().max()) for g in grads]
    if case is None:
        return effects
    bounds = _noise_bounds(case, ref_args, grad_out, out)
    return [e + bounds.get(name, 0.0) for e, name in zip(effects, names)]


def _noise_bounds(case: "Case", args: dict, grad_out: torch.Tensor, out: torch.Tensor) -> dict:
    """Upper bounds, per gradient, of two float32 errors FlashAttention's backward makes by design.

    1. delta noise n_i ~ 2 eps32 sum_d |dO_i O_i| (delta and dp_ij summed in different orders).
    2. P recomputed from the saved float32 LSE: the exponent s_ij - LSE_i carries an absolute error
       of about eps32 (|LSE_i| + |s_ij|), so P_ij a relative one; with s_ij = LSE_i + log P_ij this is
       bounded by 2 eps32 (P_ij (|LSE_i| + 1) + |P_ij log P_ij|).
    Both enter the score gradient as dS_ij error <= P_err_ij (|dp_ij| + |delta_i|) + P_ij n_i, with
    |dp_ij| <= |dO_i| . |v_j|; dV error <= sum_i P_err_ij |dO_i|.
    """
    from mfa_hf.kernels.reference import attention_reference

    eps = torch.finfo(torch.float32).eps
    with torch.no_grad():
        detached = {n: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                    for n, v in args.items()}
        _, lse, probs = attention_reference(
            detached["q"], detached["k"], detached["v"], attn_mask=detached["attn_mask"],
            alibi_slopes=detached["alibi_slopes"], sinks=detached["sinks"], return_probs=True, **case.options())
        group = case.heads_q // case.heads_kv
        scale = 1.0 / math.sqrt(case.dim)

        def heads_first(t, repeat=1):  # (B, S, H, D) -> (B, H, S, D), KV heads repeated per group
            return t.abs().transpose(1, 2).repeat_interleave(repeat, dim=1)

        do_abs = heads_first(grad_out.double())
        delta_abs = (grad_out.double() * out.double()).abs().sum(-1).transpose(1, 2)  # (B, Hq, Lq)
        delta_abs = torch.nan_to_num(delta_abs, nan=0.0)
        lse_abs = torch.nan_to_num(lse.abs(), nan=0.0, posinf=0.0)[..., None]
        p_err = 2 * eps * (probs * (lse_abs + 1) + (-torch.special.xlogy(probs, probs)).abs())
        dp_abs = do_abs @ heads_first(detached["v"], group).transpose(-1, -2)
        ds_err = p_err * (dp_abs + delta_abs[..., None]) + probs * (2 * eps * delta_abs)[..., None]

        def per_kv_head(t):  # (B, Hq, Lk, D) summed over each KV head's query group
            return t.reshape(case.batch, case.heads_kv, group, t.shape[-2], -1).sum(2)

        bounds = {
            "q": float((ds_err @ heads_first(detached["k"], group)).max()) * scale,
            "k": float(per_kv_head(ds_err.transpose(-1, -2) @ heads_first(detached["q"])).max()) * scale,
            "v": float(per_kv_head(p_err.transpose(-1, -2) @ do_abs).max()),
            "attn_mask": float(ds_err.sum(dim=(0, 1)).max()) if ds_err.numel() else 0.0,
        }
        if detached["sinks"] is not None:
            sink_probs = torch.exp(detached["sinks"].double()[None, :, None] - lse)
            sink_err = sink_probs * (2 * eps * (lse_abs[..., 0] + 1)) * delta_abs + sink_probs * 2 * eps * delta_abs
            bounds["sinks"] = float(sink_err.sum(dim=(0, 2)).max())
    return bounds


def _to_cpu_leaf(value):
    if not isinstance(value, torch.Tensor):
        return value
    return value.detach().cpu().requires_grad_(value.requires_grad)
