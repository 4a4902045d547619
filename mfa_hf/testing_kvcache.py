"""KV-cache decode cases shared by every backend's tests (torch, metal, triton).

A case is one `flash_attn_with_kvcache` call over a plain or quantized cache with ragged lengths;
the reference runs per sequence on the *dequantized* cache prefix the call should see, so the
comparison isolates the kernel (split-K, in-kernel dequantization, append) from quantization error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mfa_hf.kv_formats import QUANTIZED_NAMES, spec

FORMATS = (None, *QUANTIZED_NAMES)
BATCH, CACHE_ROWS = 3, 5
BATCH_IDX = (4, 0, 2)  # batch row b reads cache row BATCH_IDX[b]


@dataclass(frozen=True)
class DecodeCase:
    format: str | None = None
    lq: int = 1
    dtype: torch.dtype = torch.float32
    heads: tuple[int, int] = (4, 2)
    dim: int = 64
    causal: bool = True
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    sinks: bool = False
    alibi: bool = False
    batch_idx: bool = False
    num_splits: int = 0
    v_format: str | None = "same"

    @property
    def id(self) -> str:
        parts = [self.format or "plain", f"q{self.lq}", str(self.dtype).replace("torch.", ""),
                 f"h{self.heads[0]}-{self.heads[1]}", f"d{self.dim}", "causal" if self.causal else "full"]
        if self.window != (-1, -1):
            parts.append(f"w{self.window[0]}_{self.window[1]}")
        for on, name in ((self.softcap, "softcap"), (self.sinks, "sinks"), (self.alibi, "alibi"),
                         (self.batch_idx, "batchidx"), (self.num_splits, f"splits{self.num_splits}"),
                         (self.v_format != "same", f"v_{self.v_format}")):
            if on:
                parts.append(name)
        return "-".join(parts)

    def value_format(self) -> str | None:
        return self.format if self.v_format == "same" else self.v_format


def make_decode_inputs(case: DecodeCase, lengths: tuple[int, ...], capacity: int, seed: int = 0) -> dict:
    """Random caches (quantized per the case), new k/v of case.lq tokens, and the call's options."""
    import mfa_hf

    g = torch.Generator().manual_seed(seed)
    hq, hkv = case.heads
    rows = CACHE_ROWS if case.batch_idx else BATCH
    caches = []
    for fmt in (case.format, case.value_format()):
        content = torch.randn(rows, capacity, hkv, case.dim, generator=g).to(case.dtype)
        grouped = fmt is not None and spec(fmt).grouped
        group = min(spec(fmt).group_sizes) if grouped and case.dim % spec(fmt).default_group_size else None
        caches.append(content if fmt is None else mfa_hf.quantize_kv(content, fmt, group_size=group))
    return dict(
        q=torch.randn(BATCH, case.lq, hq, case.dim, generator=g).to(case.dtype),
        k_cache=caches[0], v_cache=caches[1],
        k=torch.randn(BATCH, case.lq, hkv, case.dim, generator=g).to(case.dtype),
        v=torch.randn(BATCH, case.lq, hkv, case.dim, generator=g).to(case.dtype),
        cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
        cache_batch_idx=torch.tensor(BATCH_IDX, dtype=torch.int32) if case.batch_idx else None,
        sinks=torch.randn(hq, generator=g) if case.sinks else None,
        alibi_slopes=torch.rand(hq, generator=g) * 0.3 if case.alibi else None,
    )


def odd_layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values with unusual strides: 'heads' (4-D, the two middle dims swapped in memory), 'offset'
    (every other element of a larger buffer, at an offset); or values of the same shape broadcast from one
    position ('expanded-keys', stride 0 along dim 1) or one element of the last dim ('expanded-last')."""
    if kind == "heads":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "expanded-keys":
        return t[:, :1].expand(t.shape)
    if kind == "expanded-last":
        return t[..., :1].expand(t.shape)
    buffer = torch.full((t.numel() * 2 + 3,), 7, dtype=t.dtype)
    out = buffer.as_strided(t.shape, [2 * s for s in t.contiguous().stride()], 3)
    out.copy_(t)
    return out


def run_with_odd_layouts(case: DecodeCase, codes_layout: str, capacity: int, length: int, seed: int = 0):
    """A quantized-cache call with every tensor argument in an unusual layout: the codes in `codes_layout` (see
    odd_layout), scales, q, k, v, cache_seqlens and sinks every other element of a buffer. A broadcast
    ('expanded-*') cache cannot take an append, so that call only reads it. Torch warnings are errors (its
    integer matmul warns where it falls back to a slow loop). Returns (out, lse, the inputs to check against with
    assert_matches_reference_over_cache)."""
    import warnings

    import mfa_hf

    inputs = make_decode_inputs(case, (length,) * BATCH, capacity, seed=seed)
    for name in ("k_cache", "v_cache"):
        cache = inputs[name]
        inputs[name] = mfa_hf.QuantizedKV(odd_layout(cache.codes, codes_layout), odd_layout(cache.scales, "offset"),
                                          cache.format, cache.group_size, cache.dtype)
    for name in ("q", "k", "v"):
        inputs[name] = odd_layout(inputs[name], "offset")
    reference_inputs = inputs
    if codes_layout.startswith("expanded"):
        inputs["k"] = inputs["v"] = None
        # The reference reads cache_seqlens + lq keys (an append's); without one the call reads cache_seqlens.
        reference_inputs = dict(inputs, cache_seqlens=inputs["cache_seqlens"] - case.lq)
    inputs["cache_seqlens"] = odd_layout(inputs["cache_seqlens"], "offset")
    inputs["sinks"] = None if inputs["sinks"] is None else odd_layout(inputs["sinks"], "offset")
    codes = inputs["k_cache"].codes
    # one code a row (D = 1, or nf4's D = 2): broadcasting that one element changes nothing, the layout stays plain
    assert not inputs["q"].is_contiguous() and (not codes.is_contiguous() or codes_layout == "expanded-last"
                                                and codes.shape[-1] == 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = run_kvcache(case, inputs)
    return out, lse, reference_inputs


def caches_on(inputs: dict, device) -> dict:
    """`inputs` with k_cache and v_cache (tensors or QuantizedKV) moved to `device` (the call appends
    to them in place, and the reference reads the appended tokens back on the CPU)."""
    import mfa_hf

    moved = dict(inputs)
    for name in ("k_cache", "v_cache"):
        cache = inputs[name]
        if isinstance(cache, mfa_hf.QuantizedKV):
            moved[name] = mfa_hf.QuantizedKV(cache.codes.to(device), cache.scales.to(device), cache.format,
                                             cache.group_size, cache.dtype)
        else:
            moved[name] = cache.to(device)
    return moved


def assert_matches_reference_over_cache(case: DecodeCase, inputs: dict, out, lse) -> None:
    """out and lse of a call against the reference over the caches as the call left them (appended
    tokens included; the caches may live on any device), with the DESIGN.md tolerance."""
    from mfa_hf.testing import FORWARD_FACTOR, GRADIENT_FACTOR, assert_close_to_reference

    after = caches_on(inputs, "cpu")
    ref, ref_lse = reference_over_cache(case, after, upcast=True)
    base, base_lse = reference_over_cache(case, after, upcast=False)
    factor = GRADIENT_FACTOR if case.softcap else FORWARD_FACTOR
    assert_close_to_reference(out.cpu(), ref, base, factor, "out")
    assert_close_to_reference(lse.cpu(), ref_lse, base_lse, factor, "lse")


def dense(cache) -> torch.Tensor:
    import mfa_hf

    return cache.dequantize(torch.float64) if isinstance(cache, mfa_hf.QuantizedKV) else cache


def reference_over_cache(case: DecodeCase, inputs: dict, upcast: bool, k_cache=None, v_cache=None):
    """Per sequence: the reference on the (dequantized) cache prefix the call should see.

    The caches default to inputs' own (read after the call, so appended tokens are included).
    """
    from mfa_hf.kernels.reference import attention_reference

    lengths = (inputs["cache_seqlens"].cpu() + case.lq).tolist()
    rows = inputs["cache_batch_idx"].tolist() if case.batch_idx else list(range(BATCH))
    dense_k = dense(inputs["k_cache"] if k_cache is None else k_cache)
    dense_v = dense(inputs["v_cache"] if v_cache is None else v_cache)
    dtype = torch.float64 if upcast else case.dtype
    outs, lses = [], []
    for b, (row, length) in enumerate(zip(rows, lengths)):
        out, lse = attention_reference(
            inputs["q"][b : b + 1].cpu().to(dtype), dense_k[row : row + 1, :length].cpu().to(dtype),
            dense_v[row : row + 1, :length].cpu().to(dtype), causal=case.causal, window_size=case.window,
            softcap=case.softcap, sinks=_cpu(inputs["sinks"]), alibi_slopes=_cpu(inputs["alibi_slopes"]),
            upcast=upcast)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _cpu(t):
    return None if t is None else t.cpu()


def run_kvcache(case: DecodeCase, inputs: dict, device=None):
    """The call under test; tensors moved to `device` (caches must already live there)."""
    import mfa_hf

    def on(t):
        return t.to(device) if device is not None and isinstance(t, torch.Tensor) else t

    return mfa_hf.flash_attn_with_kvcache(
        on(inputs["q"]), inputs["k_cache"], inputs["v_cache"], on(inputs["k"]), on(inputs["v"]),
        cache_seqlens=on(inputs["cache_seqlens"]), cache_batch_idx=on(inputs["cache_batch_idx"]),
        causal=case.causal, window_size=case.window, softcap=case.softcap, alibi_slopes=on(inputs["alibi_slopes"]),
        sinks=on(inputs["sinks"]), return_lse=True, num_splits=case.num_splits)


def assert_path_switch_agrees(switch, case: DecodeCase, length: int, capacity: int) -> None:
    """The same decode with `switch` (a callable turning a fast path on or off) on, then off: out and lse agree
    to float32 rounding. Both paths are also checked against the reference on their own; this catches a path
    that drifts from the other within the reference's tolerance."""
    results = []
    for enabled in (True, False):
        switch(enabled)
        inputs = make_decode_inputs(case, (length,) * BATCH, capacity, seed=5)
        results.append(run_kvcache(case, inputs))
    for on, off in zip(*results):
        torch.testing.assert_close(on, off, rtol=2e-5, atol=2e-6)


def assert_served_and_matches_reference(case: DecodeCase, capacity: int, last_served, path: str, seed: int = 0):
    """The decode over a cache holding 0, 41 and capacity - 1 tokens before the new one: `last_served()` (the
    length the path under test last served, from the test's recording) must be that length + 1, the output
    dtypes right, and the result within the reference's tolerance."""
    for length in (0, 41, capacity - 1):
        inputs = make_decode_inputs(case, (length,) * BATCH, capacity, seed=length + seed)
        out, lse = run_kvcache(case, inputs)
        assert last_served() == length + 1, f"the {path} did not serve this call"
        assert out.dtype == case.dtype and lse.dtype == torch.float32
        assert_matches_reference_over_cache(case, inputs, out, lse)


def record_calls(monkeypatch, owner, name: str, entry) -> list:
    """Wrap `owner.name` (a path under test) so that every call appends entry(*args) to the returned list."""
    calls, original = [], getattr(owner, name)

    def recording(*args):
        calls.append(entry(*args))
        return original(*args)

    monkeypatch.setattr(owner, name, recording)
    return calls
