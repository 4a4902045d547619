"""Comparing a call's outputs and gradients with the reference: mfa_hf/testing.py's tolerance rule as
lists of failures, with the allowance for noise the algorithm itself adds (`noise_bounds`)."""

from __future__ import annotations

import math

import torch

from ..testing import assert_close_to_reference, delta_rounding_effect


def coarser(*dtypes: torch.dtype) -> torch.dtype:
    floats = [d for d in dtypes if d.is_floating_point]
    return max(floats, key=lambda d: torch.finfo(d).eps)


def _locate(actual: torch.Tensor, reference: torch.Tensor) -> str:
    """Where and how actual differs most from reference (for the failure message)."""
    a = actual.detach().cpu().to(torch.float64)
    r = reference.detach().to(torch.float64)
    if a.shape != r.shape or a.numel() == 0:
        return ""
    nan_diff = torch.isnan(a) != torch.isnan(r)
    if bool(nan_diff.any()):
        index = tuple(int(i) for i in nan_diff.nonzero()[0])
        return f"; first NaN mismatch at {index}: got {float(a[index]):.6g}, want {float(r[index]):.6g}"
    finite = torch.isfinite(r)
    inf_diff = ~finite & ~torch.isnan(r) & (a != r)
    if bool(inf_diff.any()):
        index = tuple(int(i) for i in inf_diff.nonzero()[0])
        return f"; first infinity mismatch at {index}: got {float(a[index]):.6g}, want {float(r[index]):.6g}"
    error = torch.where(finite, (a - r).abs(), 0.0)
    error = torch.nan_to_num(error, nan=math.inf)
    flat_index = int(error.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), a.shape))
    zero_rows = ""
    if a.dim() >= 2:
        rows_zero = (a == 0).all(-1) & (r != 0).any(-1)
        if bool(rows_zero.any()):
            zero_rows = f"; {int(rows_zero.sum())} rows are 0 where the reference's are not"
    return f"; worst at {index}: got {float(a[index]):.6g}, want {float(r[index]):.6g}{zero_rows}"


def compare(name: str, actual, reference: torch.Tensor, baseline: torch.Tensor, factor: float,
            dtype: torch.dtype | None = None, algorithmic: float = 0.0) -> list[str]:
    """testing.assert_close_to_reference as a list of failures (with where the worst error is)."""
    if actual is None:
        return [f"{name}: missing (None) where the reference has a {tuple(reference.shape)} tensor"]
    actual = actual.detach().cpu()
    try:
        assert_close_to_reference(actual, reference, baseline, factor, name, dtype, algorithmic)
    except AssertionError as error:
        return [f"{error}{_locate(actual, reference)}"]
    return []


def compare_lse(lse, ref_lse, base_lse, factor: float) -> list[str]:
    """The LSE as a whole, then (when some rows' LSE is huge: finfo.min masks) the ordinary rows on
    their own, so that one huge row's ulp does not become everyone's tolerance."""
    failures = compare("lse", lse, ref_lse, base_lse, factor)
    huge = torch.isfinite(ref_lse) & (ref_lse.abs() > 1e20)
    if failures or not bool(huge.any()) or lse is None:
        return failures
    ordinary = ~huge
    return compare("lse (rows without a finfo.min mask)", lse.detach().cpu()[ordinary], ref_lse[ordinary],
                   base_lse.detach()[ordinary], factor)


def noise_bounds(q, k, v, out, grad_out, grad_lse, mask, slopes, sinks, causal, window, softcap,
                 scale: float | None = None) -> dict:
    """testing._noise_bounds per element (dense (B, S, H, D) tensors, float64 on the CPU).

    Generalized for this module: the LSE's gradient (the backward's delta becomes rowsum(dO O) -
    dLSE), masks of any broadcast shape, and per-element bounds that the caller sums over expanded
    dims. Returns bounds shaped like q, k, v (B, S, H, D), the mask (B, Hq, Lq, Lk) and sinks (Hq,).
    """
    from ..kernels.reference import attention_reference

    eps = torch.finfo(torch.float32).eps
    batch, lq, heads_q, dim = q.shape
    heads_kv = k.shape[2]
    group = heads_q // heads_kv
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    with torch.no_grad():
        _, lse, probs = attention_reference(q, k, v, attn_mask=mask, alibi_slopes=slopes, sinks=sinks, causal=causal,
                                            window_size=window, softcap=softcap, return_probs=True)

        def heads_first(t, repeat=1):
            return t.abs().transpose(1, 2).repeat_interleave(repeat, dim=1)

        do_abs = heads_first(grad_out)
        delta_abs = torch.nan_to_num((grad_out * out).abs().sum(-1), nan=0.0).transpose(1, 2)  # (B, Hq, Lq)
        if grad_lse is not None:
            delta_abs = delta_abs + torch.nan_to_num(grad_lse.abs(), nan=0.0)
        lse_abs = torch.nan_to_num(lse.abs(), nan=0.0, posinf=0.0)[..., None]
        p_err = 2 * eps * (probs * (lse_abs + 1) + (-torch.special.xlogy(probs, probs)).abs())
        dp_abs = do_abs @ heads_first(v, group).transpose(-1, -2)
        ds_err = p_err * (dp_abs + delta_abs[..., None]) + probs * (2 * eps * delta_abs)[..., None]

        def per_kv_head(t):
            return t.reshape(batch, heads_kv, group, t.shape[-2], t.shape[-1]).sum(2)

        bounds = {
            "q": (ds_err @ heads_first(k, group)).transpose(1, 2) * scale,
            "k": per_kv_head(ds_err.transpose(-1, -2) @ heads_first(q)).transpose(1, 2) * scale,
            "v": per_kv_head(p_err.transpose(-1, -2) @ do_abs).transpose(1, 2),
            "attn_mask": ds_err,
        }
        if sinks is not None:
            sink_probs = torch.exp(sinks[None, :, None] - lse)
            sink_probs = torch.nan_to_num(sink_probs, nan=0.0)
            sink_err = sink_probs * (2 * eps * (lse_abs[..., 0] + 1)) * delta_abs + sink_probs * 2 * eps * delta_abs
            bounds["sinks"] = sink_err.sum(dim=(0, 2))
    return bounds


def rounding_effects(out, ref, ref_lse, leaves, grad_out) -> list[float]:
    """testing.delta_rounding_effect per leaf (0 for empty leaves and empty outputs)."""
    effects = [0.0] * len(leaves)
    nonempty = [n for n, leaf in enumerate(leaves) if leaf.numel()]
    if not nonempty or out.numel() == 0 or not ref_lse.requires_grad:
        return effects
    found = delta_rounding_effect(out.detach().cpu(), ref, ref_lse, [leaves[n] for n in nonempty], grad_out)
    for n, effect in zip(nonempty, found):
        effects[n] = effect
    return effects


def reduce_bound(bound: torch.Tensor | None, compact: tuple) -> float:
    """A per-element bound summed over the dims an argument's values were expanded or broadcast along."""
    if bound is None or bound.numel() == 0:
        return 0.0
    rank = len(compact)
    if bound.dim() > rank:  # a mask passed with fewer dims: the leading dims broadcast
        bound = bound.sum(dim=tuple(range(bound.dim() - rank)))
    return float(bound.sum_to_size(compact).max()) if math.prod(compact) else 0.0

