"""The semantics of record: a naive attention that materializes the score matrix.

Every backend must agree with this file. It is written to be read, not to be fast, and is used only
by tests and for debugging small cases. Meanings (FlashAttention-2's, where FA2 defines one):

- Layout: q (B, Lq, Hq, Dqk), k (B, Lk, Hkv, Dqk), v (B, Lk, Hkv, Dv). Output (B, Lq, Hq, Dv),
  LSE (B, Hq, Lq). Hq is a multiple of Hkv (GQA/MQA): query head h reads KV head h // (Hq // Hkv).
- softmax_scale None means 1 / sqrt(Dqk).
- Causal and windows align bottom-right: query i sits on the diagonal j = i + Lk - Lq.
  window_size = (left, right), -1 unbounded: key j is visible from query i when
  i + Lk - Lq - left <= j <= i + Lk - Lq + right. causal=True forces right = 0.

        Lq=2, Lk=5, causal            Lq=5, Lk=2, causal
        q0: 1 1 1 1 0                 q0: 0 0   (sees nothing -> output 0)
        q1: 1 1 1 1 1                 q1: 0 0
                                      q2: 0 0
                                      q3: 1 0
                                      q4: 1 1

- softcap > 0: s = softcap * tanh(s / softcap), applied to scaled scores before anything is added.
- ALiBi: s += -slope[h] * |i + Lk - Lq - j| (slopes (Hq,) or (B, Hq)).
- attn_mask: bool (True = attend) or additive float, broadcastable to (B, Hq, Lq, Lk); an additive
  mask is added exactly, never thresholded.
- sinks: one logit per query head (Hq,) that joins the softmax denominator and adds nothing to the
  output; it is not scaled, capped or masked. The LSE includes it.
- A query row with no visible key (and no sink) outputs 0 with LSE = -inf, never NaN. NaN inputs
  propagate to every output that sees them; whether a NaN in a key or value a row cannot see
  reaches that row is unspecified (kernels skip whole blocks but multiply 0 * NaN inside one).
- dropout: applied to the normalized probabilities with the counter-based keep mask of
  kernels/dropout.py (seeded explicitly); kept values are scaled by 1 / (1 - p). The LSE is of the
  undropped scores.
- Backends accumulate in float32 (float64 here) and return the input dtype; LSE is float32.
"""

from __future__ import annotations

import math

import torch

from .dropout import keep_mask

NO_WINDOW = (-1, -1)


def visible_keys(
    lq: int, lk: int, causal: bool, window_size: tuple[int, int], device: torch.device | None = None
) -> torch.Tensor:
    """(Lq, Lk) bool: True where key j is visible from query i (bottom-right aligned)."""
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    diagonal = i + lk - lq
    ok = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= diagonal - left
    if right >= 0:
        ok &= j <= diagonal + right
    return ok


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = NO_WINDOW,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
    dropout_batch_offset: int = 0,
    upcast: bool = True,
    return_probs: bool = False,
):
    """Attention over (B, S, H, D) tensors. Returns (out, lse).

    upcast=True computes in float64 (the reference of record). upcast=False computes the way plain
    PyTorch would in the input dtype (scores and products in that dtype, softmax in float32); its
    error against the float64 result sets the tolerance for kernels (DESIGN.md).
    dropout_batch_offset numbers the batch for the dropout hash (varlen sequence b uses b).
    return_probs=True also returns the softmax probabilities (B, Hq, Lq, Lk) before dropout.
    """
    batch, lq, hq, dqk = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    dtype = torch.float64 if upcast else q.dtype
    scale = 1.0 / math.sqrt(dqk) if softmax_scale is None else softmax_scale

    qh = q.to(dtype).transpose(1, 2)  # (B, Hq, Lq, D)
    kh = k.to(dtype).transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    vh = v.to(dtype).transpose(1, 2).repeat_interleave(hq // hkv, dim=1)

    scores = (qh @ kh.transpose(-1, -2)).to(torch.float64 if upcast else torch.float32) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        distance = (visible_offsets(lq, lk, scores.device)).abs().to(scores.dtype)
        slopes = alibi_slopes.to(scores.dtype).reshape(-1, hq)[:, :, None, None]
        scores = scores - slopes * distance
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, -math.inf)
        else:
            scores = scores + attn_mask.to(scores.dtype)
    scores = scores.masked_fill(~visible_keys(lq, lk, causal, window_size, scores.device), -math.inf)

    row_max = scores.amax(dim=-1, keepdim=True) if lk > 0 else scores.new_full((batch, hq, lq, 1), -math.inf)
    if sinks is not None:
        sink = sinks.to(scores.dtype)[None, :, None, None]
        row_max = torch.maximum(row_max, sink)
    safe_max = torch.where(row_max == -math.inf, torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - safe_max)
    denom = weights.sum(dim=-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.exp(sink - safe_max)
    # A row with no visible key has weights 0 and denom 0: use 1 there so that its output is 0,
    # its LSE -inf, and its gradients 0 (0 / 0 or log(0) inside torch.where would poison the
    # backward with NaN).
    empty_row = denom == 0
    safe_denom = torch.where(empty_row, torch.ones_like(denom), denom)
    lse = torch.where(empty_row, -math.inf, safe_max + torch.log(safe_denom)).squeeze(-1)
    probs = weights / safe_denom
    undropped = probs

    if dropout_p > 0:
        if dropout_seed is None:
            raise ValueError("dropout_seed: expected a seed tensor when dropout_p > 0, got None")
        first = dropout_batch_offset * hq
        batch_head = torch.arange(first, first + batch * hq, device=q.device).reshape(batch, hq, 1, 1)
        rows = torch.arange(lq, device=q.device)
        cols = torch.arange(lk, device=q.device)
        keep = keep_mask(dropout_seed.to(q.device), batch_head, rows, cols, dropout_p)
        probs = probs * keep / (1.0 - dropout_p)

    out = probs.to(dtype) @ vh  # (B, Hq, Lq, Dv)
    lse = lse.to(torch.float64 if upcast else torch.float32)
    if return_probs:
        return out.transpose(1, 2), lse, undropped
    return out.transpose(1, 2), lse


def visible_offsets(lq: int, lk: int, device: torch.device | None = None) -> torch.Tensor:
    """(Lq, Lk) signed distance i + Lk - Lq - j from each key to the query's diagonal."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return i + lk - lq - j


def attention_reference_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sequences: q (Tq, Hq, D), k/v (Tk, Hkv, D); sequence b spans cu[b]:cu[b+1].

    Returns out (Tq, Hq, Dv) and lse (Hq, Tq), as flash_attn_varlen_func does. ALiBi slopes of shape
    (B, Hq) select row b for sequence b; dropout uses b as the batch index.
    """
    outs, lses = [], []
    slopes = options.pop("alibi_slopes", None)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(starts_q) - 1):
        qs, qe, ks, ke = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        seq_slopes = None
        if slopes is not None:
            seq_slopes = slopes[b] if slopes.dim() == 2 else slopes
        out, lse = attention_reference(
            q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], alibi_slopes=seq_slopes,
            dropout_batch_offset=b, **options
        )
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=-1)
