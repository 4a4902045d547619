"""The S_dmask that return_attn_probs=True returns with dropout_p > 0, in FlashAttention-2's encoding.

FA2 documents S_dmask as a testing aid whose values "are not guaranteed to be correct"; its own
tests decode it (tests/test_flash_attn.py: convert_flash_attn_S_to_softmax, normalize_flash_attn_S):

- shape (batch, nheads, seqlen_q rounded up to 128, seqlen_k rounded up to 128), q's dtype; for
  the varlen functions sequence b occupies [b, :, :len_q(b), :len_k(b)]; the rest is 0;
- |S[b, h, i, j]| = exp(s_ij - m_ij): s the scaled (softcapped, ALiBi-biased, masked) score and
  m_ij the running row maximum of a kernel that visits key blocks of width
  _get_block_size_n(...) from the last block to the first (so m_ij is the maximum over the blocks
  from j's block to the end); multiplying by exp(m_ij - lse_i) gives the softmax probability;
- the sign is the dropout decision: negative where the element was dropped.

mfa-hf's kernels do not materialize this matrix; it is recomputed here from q and k in float32, and
its dropout signs come from the same counter-based keep mask (kernels/dropout.py) and seed the
kernel used for `out`, so the mask a caller decodes is the one that produced the output. Costs
O(nheads * seqlen_q * seqlen_k) memory per batch row: a testing aid, as in FA2.
"""

from __future__ import annotations

import math

import torch

from mfa_hf.kernels.dropout import keep_mask
from mfa_hf.kernels.reference import visible_keys

BLOCK_N = 128  # the key-block width of the encoding; _get_block_size_n reports it
ROUND = 128  # FA2 rounds S_dmask's sequence dimensions up to a multiple of 128


def rounded(n: int) -> int:
    return (n + ROUND - 1) // ROUND * ROUND


CHUNK_ELEMENTS = 1 << 27  # score elements encoded at once (a few float32 temporaries of this size)


@torch.no_grad()
def _encode(q, k, *, scale, causal, window, softcap, slopes, seed, dropout_p, first_batch):
    """q (n, Sq, Hq, D), k (n, Sk, Hkv, D): n consecutive sequences numbered first_batch, ... ->
    (n, Hq, Sq, Sk) float32. slopes: None or (n, Hq)."""
    n, lq, heads_q, _ = q.shape
    lk, heads_kv = k.shape[1], k.shape[2]
    if lk == 0:
        return q.new_zeros((n, heads_q, lq, 0), dtype=torch.float32)
    keys = k.repeat_interleave(heads_q // heads_kv, dim=2) if heads_kv != heads_q else k
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), keys.float()) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        s = s - slopes.float().reshape(n, heads_q, 1, 1) * (i + lk - lq - j).abs().float()
    s = s.masked_fill(~visible_keys(lq, lk, causal, window, q.device), -math.inf)
    blocks = -(-lk // BLOCK_N)
    padded = torch.nn.functional.pad(s, (0, blocks * BLOCK_N - lk), value=-math.inf)
    block_max = padded.view(n, heads_q, lq, blocks, BLOCK_N).amax(dim=-1)
    running = block_max.flip(-1).cummax(dim=-1).values.flip(-1)  # max over this block and later ones
    m = running.repeat_interleave(BLOCK_N, dim=-1)[..., :lk]
    visible = s != -math.inf
    unnormalized = torch.where(visible, torch.exp(s - torch.where(visible, m, 0.0)), 0.0)
    batch_head = (first_batch * heads_q + torch.arange(n * heads_q, device=q.device)).reshape(n, heads_q, 1, 1)
    keep = keep_mask(seed.to(q.device), batch_head, torch.arange(lq, device=q.device),
                     torch.arange(lk, device=q.device), dropout_p)
    return torch.where(keep, unnormalized, -unnormalized)


def _slopes(alibi_slopes, first: int, n: int):
    if alibi_slopes is None:
        return None
    if alibi_slopes.dim() == 2:
        return alibi_slopes[first : first + n]
    return alibi_slopes.reshape(1, -1).expand(n, -1)


def dense(q, k, *, scale, causal, window, softcap, alibi_slopes, seed, dropout_p):
    """q (B, Sq, Hq, D), k (B, Sk, Hkv, D) -> S_dmask (B, Hq, rounded(Sq), rounded(Sk))."""
    batch, lq, heads_q, _ = q.shape
    lk = k.shape[1]
    out = q.new_zeros((batch, heads_q, rounded(lq), rounded(lk)))
    step = max(1, CHUNK_ELEMENTS // max(1, heads_q * lq * lk))
    for b in range(0, batch, step):
        n = min(step, batch - b)
        out[b : b + n, :, :lq, :lk] = _encode(
            q[b : b + n], k[b : b + n], scale=scale, causal=causal, window=window, softcap=softcap,
            slopes=_slopes(alibi_slopes, b, n), seed=seed, dropout_p=dropout_p, first_batch=b)
    return out


def varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, scale, causal, window, softcap,
           alibi_slopes, seed, dropout_p):
    """Packed q (Tq, Hq, D), k (Tk, Hkv, D) -> S_dmask (B, Hq, rounded(max_q), rounded(max_k))."""
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    batch, heads_q = len(starts_q) - 1, q.shape[1]
    out = q.new_zeros((batch, heads_q, rounded(int(max_seqlen_q)), rounded(int(max_seqlen_k))))
    for b in range(batch):
        qs, qe, ks, ke = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        out[b, :, : qe - qs, : ke - ks] = _encode(
            q[None, qs:qe], k[None, ks:ke], scale=scale, causal=causal, window=window, softcap=softcap,
            slopes=_slopes(alibi_slopes, b, 1), seed=seed, dropout_p=dropout_p, first_batch=b)[0]
    return out
