"""Test helpers shared by every backend's tests: the tolerance rule of DESIGN.md, poisoning, inputs.

The rule (FlashAttention's): a kernel's max error against the float64 reference may be at most
`factor` times the error of plain PyTorch math in the input dtype on the same inputs, plus a floor
of half an ulp of the input dtype at the output's magnitude (and 1e-6 absolute, for float32 whose
PyTorch baseline can be nearly exact). factor is 2 for forward outputs, 3 for gradients and softcap.
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
) -> None:
    """actual: kernel result; reference: float64 result; baseline: PyTorch math in the input dtype."""
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
                            actual.dtype, factor)
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
        keep[:, :, 1] = False  # a fully masked row
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
