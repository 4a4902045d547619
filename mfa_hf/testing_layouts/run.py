"""Running one spec (in whatever process has the backend's environment): make the inputs, call the API
with the backend MFA_BACKEND forces, and list every output, LSE, gradient and side effect that differs
from kernels/reference.py.

Gradients of rows that an additive finfo(float32).min mask covers entirely get a zero upstream
gradient here: FlashAttention's backward recomputes P = exp(s - LSE) from the float32 LSE, which has
absorbed the scores (s - LSE = 0, P = 1 instead of 1/n), an error testing._noise_bounds allows by
design; leaving those rows in would make every other gradient's allowance vacuous.
"""

from __future__ import annotations

import os

import torch

from ..testing import FORWARD_FACTOR, GRADIENT_FACTOR
from .checks import coarser, compare, compare_lse, noise_bounds, reduce_bound, rounding_effects
from .layouts import Placed, bits, chain, compact_shape, dtype_of, place, unchanged
from .specs import DenseSpec, KVCacheSpec, VarlenSpec
from .values import mask_values, seeded_generator, seeded_randn, vector_values

ABSORBING = 1e30  # an additive mask value this negative swallows any score in float32
GRADIENT_ORDER = ["q", "k", "v", "sinks", "attn_mask"]  # the order gradients are compared (and reported) in


def current_backend() -> str:
    return os.environ.get("MFA_BACKEND", "auto").strip().lower()


def default_device(backend: str | None = None) -> str:
    backend = backend or current_backend()
    if backend == "metal":
        from ..kernels.metal.emulator.runtime_select import metal_runtime

        return metal_runtime().device
    if backend == "triton" and os.environ.get("MFA_TRITON_FULL") == "1":
        return "cuda"
    return "cpu"


def run_spec(spec, device: str | None = None) -> list[str]:
    """Run one spec with the backend MFA_BACKEND forces; returns the failures (empty = pass)."""
    device = device or default_device()
    runner = {DenseSpec: _run_dense, VarlenSpec: _run_varlen, KVCacheSpec: _run_kvcache}[type(spec)]
    return runner(spec, device)


# ----------------------------------------------------------------------------------------------
# What the three runners share


def _served(calls, op: str) -> list[str]:
    from .. import trace

    backend = current_backend()
    served = trace.served_by(calls)
    if backend == "auto" or served[(backend, op)] == 1:
        return []
    return [f"{op}: expected one call of the {backend} backend's {op} op, got {dict(served)}"]


def _traced(what: str, op: str, call) -> tuple[bool, object, list[str]]:
    """(raised, call's result, failures): call() under the trace; a failure when it raises (to report,
    not to hide) or when the forced backend did not serve `op` exactly once."""
    from .. import trace

    with trace.capture() as calls:
        try:
            result = call()
        except Exception as error:  # noqa: BLE001 - a failure to report, not to hide
            return True, None, [f"{what} raised {type(error).__name__}: {error}"]
    return False, result, _served(calls, op)


def _inputs_unchanged(placed: dict, when: str) -> list[str]:
    return [f"{name}: its buffer ({p.layout.name}) changed during the {when} (a kernel wrote into an input or its "
            f"gaps)" for name, p in placed.items() if p is not None and not unchanged(p)]


def _leaf_copies(values: dict, upcast: bool, grads: tuple, shapes: dict) -> tuple[dict, dict]:
    """(arguments, leaves) for the reference: float64 copies (upcast) or copies in their own dtype."""
    args, leaves = {}, {}
    for name, value in values.items():
        if value is None:
            args[name] = None
            continue
        t = value.detach().to(torch.float64) if upcast and value.is_floating_point() else value.detach().clone()
        if name in grads:
            t.requires_grad_(True)
            leaves[name] = t
        args[name] = t.expand(shapes[name])
        if name in grads and upcast and args[name].numel() > t.numel():
            # The exact gradient of each element of an expanded argument, before autograd sums them: the call
            # under test returns them rounded to the argument's dtype one by one (_backward_failures).
            args[name].register_hook(lambda grad, leaf=t: setattr(leaf, "elementwise_grad", grad))
    return args, leaves


def _expanded_rounding(leaf: torch.Tensor, dtype: torch.dtype, compact: tuple) -> float:
    """What rounding each element's gradient to `dtype` adds once autograd sums an expanded argument's elements:
    half an ulp of each, summed over the expanded dims. The exact sum can cancel to about 0 (identical keys: the
    uniform attention's per-token dK cancel in pairs) while the rounded parts do not, which a bound measured at the
    sum's own size cannot allow (a fuzzed bf16 varlen case: 0.046 off, against 0.037 allowed)."""
    elementwise = getattr(leaf, "elementwise_grad", None)
    if elementwise is None or not dtype.is_floating_point:
        return 0.0
    return reduce_bound(0.5 * torch.finfo(dtype).eps * elementwise.abs(), compact)


def _absorbing_rows(mask64: torch.Tensor | None, full_shape: tuple, causal: bool, window: tuple) -> torch.Tensor:
    """(B, Hq, Lq) True where an additive mask swallows every visible key's score (finfo.min)."""
    from ..kernels.reference import visible_keys

    batch, heads, lq, lk = full_shape
    if mask64 is None or mask64.dtype == torch.bool:
        return torch.zeros(batch, heads, lq, dtype=torch.bool)
    mask = mask64.to(torch.float64).expand(full_shape)
    visible = visible_keys(lq, lk, causal, window)
    swallowed = (mask < -ABSORBING) & torch.isfinite(mask)
    return (swallowed | ~visible).all(-1) & (swallowed & visible).any(-1)


def _random_arguments(spec, shapes: dict, layouts: dict) -> dict:
    """The compact values of the float arguments in `shapes`, with q's NaN when the spec asks for one."""
    dtype = dtype_of(spec.dtype)
    values = {name: seeded_randn(compact_shape(shapes[name], layouts[name]), dtype, spec.seed, name)
              for name in shapes}
    if getattr(spec, "nan_q", False) and values["q"].numel():
        g = seeded_generator(spec.seed, "nan")
        index = tuple(int(torch.randint(n, (1,), generator=g)) for n in values["q"].shape)
        values["q"][index] = float("nan")
    return values


def _add_vectors(spec, full: dict, values: dict, shapes: dict, layouts: dict, alibi_stream: str = "alibi") -> None:
    """alibi_slopes and sinks (None when the spec has none). alibi_stream names the slopes' random
    stream: the kvcache runner has always drawn them as "alibi_slopes", kept so its seeds reproduce."""
    for name, stream, vector, positive in (("alibi_slopes", alibi_stream, spec.alibi, True),
                                           ("sinks", "sinks", spec.sinks, False)):
        values[name] = None
        if vector is not None:
            values[name], shapes[name] = vector_values(vector, full, spec.seed, stream, positive)
            layouts[name] = vector.layout


def _place_all(values: dict, shapes: dict, layouts: dict, device, differentiable: set, seed: int) -> dict:
    return {name: None if value is None else place(value, shapes[name], layouts[name], device,
                                                   name in differentiable, seed)
            for name, value in values.items()}


def _forward_failures(out, lse, reference: tuple, baseline: tuple, softcap: float) -> list[str]:
    """out and LSE against the float64 reference, with the reference in the inputs' dtype as the baseline."""
    factor = GRADIENT_FACTOR if softcap > 0 else FORWARD_FACTOR
    return (compare("out", out, reference[0].detach(), baseline[0].detach(), factor)
            + compare_lse(lse, reference[1].detach(), baseline[1].detach(), factor))


def _forward_checks(out, lse, reference, softcap: float, placed: dict) -> tuple[tuple, tuple, list[str]]:
    """(reference, baseline, failures): reference(upcast) in float64 and in the inputs' dtype, out and LSE
    compared with them, and every input buffer checked after the forward."""
    ref, base = reference(True), reference(False)
    return ref, base, _forward_failures(out, lse, ref, base, softcap) + _inputs_unchanged(placed, "forward")


def _backward_failures(spec, device, out, lse, placed: dict, values: dict, reference: tuple, baseline: tuple,
                       absorbing: torch.Tensor | None, bounds_of) -> list[str]:
    """Backpropagate seeded grad_out (and grad_lse) through the call and both references, then compare
    every gradient, then check the inputs again. absorbing: (B, Hq, Lq) rows whose upstream gradients are zeroed (see the module's
    docstring); bounds_of(go_full, glse_full): the algorithm's own noise per argument."""
    dtype = dtype_of(spec.dtype)
    zeroed = absorbing is not None and bool(absorbing.any())
    go_layout, glse_layout = spec.grad_out, spec.grad_lse
    if zeroed:  # zeroed rows: no expanding along the rows or heads
        go_layout = go_layout.without_expand()
        glse_layout = None if glse_layout is None else glse_layout.without_expand()
    go_value = seeded_randn(compact_shape(tuple(out.shape), go_layout), dtype, spec.seed, "grad_out")
    if zeroed:
        go_value = go_value.masked_fill(absorbing.transpose(1, 2)[..., None], 0.0)
    grad_out = place(go_value, tuple(out.shape), go_layout, device, seed=spec.seed)
    outputs, cotangents = [out], [grad_out.arg]
    grad_lse = None
    if glse_layout is not None:
        glse_value = seeded_randn(compact_shape(tuple(lse.shape), glse_layout), lse.dtype, spec.seed, "grad_lse")
        glse_value = glse_value.masked_fill(absorbing, 0.0) if zeroed else glse_value
        grad_lse = place(glse_value, tuple(lse.shape), glse_layout, device, seed=spec.seed)
        outputs.append(lse)
        cotangents.append(grad_lse.arg)
    raised, _, failures = _traced("backward", "bwd", lambda: torch.autograd.backward(outputs, cotangents))
    if raised:
        return failures
    go_full = grad_out.value.expand(tuple(out.shape))
    glse_full = None if grad_lse is None else grad_lse.value.expand(tuple(lse.shape))
    ref, ref_lse, ref_leaves = reference
    names = sorted(ref_leaves, key=GRADIENT_ORDER.index)
    rounding = rounding_effects(out, ref, ref_lse, [ref_leaves[n] for n in names], go_full)
    for outputs_, lse_, cot_dtype in ((ref, ref_lse, torch.float64), (baseline[0], baseline[1], None)):
        cots = [go_full.to(cot_dtype or out.dtype)]
        if glse_full is not None:
            cots.append(glse_full.to(cot_dtype or lse.dtype))
        torch.autograd.backward([outputs_, lse_][:len(cots)], cots)
    bounds = bounds_of(go_full, glse_full)
    for name, effect in zip(names, rounding):
        compact = tuple(values[name].shape)
        algorithmic = (effect + reduce_bound(bounds.get(name), compact)
                       + _expanded_rounding(ref_leaves[name], values[name].dtype, compact))
        failures += compare(f"d{name}", placed[name].grad(), ref_leaves[name].grad, baseline[2][name].grad,
                            GRADIENT_FACTOR, coarser(dtype, values[name].dtype), algorithmic)
    return failures + _inputs_unchanged(placed, "backward")


# ----------------------------------------------------------------------------------------------
# The three calls


def _run_dense(spec: DenseSpec, device) -> list[str]:
    import mfa_hf

    from ..kernels.reference import attention_reference

    b, lq, lk, hq, hkv = spec.batch, spec.lq, spec.lk, spec.heads_q, spec.heads_kv
    full = {"B": b, "H": hq, "Lq": lq, "Lk": lk}
    grads = spec.backward and not spec.nan_q
    shapes = {"q": (b, lq, hq, spec.dim), "k": (b, lk, hkv, spec.dim), "v": (b, lk, hkv, spec.dim_v)}
    layouts = {"q": spec.q, "k": spec.k, "v": spec.v}
    values = _random_arguments(spec, shapes, layouts)
    differentiable = {"q", "k", "v"} if grads else set()
    values["attn_mask"] = None
    if spec.mask is not None:
        values["attn_mask"], shapes["attn_mask"] = mask_values(spec.mask, full, spec.seed)
        layouts["attn_mask"] = spec.mask.layout
        if grads and spec.mask.additive and spec.mask.requires_grad:
            differentiable.add("attn_mask")
    _add_vectors(spec, full, values, shapes, layouts)
    if grads and spec.sinks is not None and spec.sinks.requires_grad:
        differentiable.add("sinks")
    placed = _place_all(values, shapes, layouts, device, differentiable, spec.seed)
    arg = {name: None if p is None else p.arg for name, p in placed.items()}
    options = dict(causal=spec.causal, window_size=tuple(spec.window), softcap=spec.softcap)
    raised, result, failures = _traced("forward", "fwd", lambda: mfa_hf.flash_attn_func(
        arg["q"], arg["k"], arg["v"], attn_mask=arg["attn_mask"], alibi_slopes=arg["alibi_slopes"],
        sinks=arg["sinks"], return_lse=True, **options))
    if raised:
        return failures
    out, lse = result

    def reference(upcast: bool):
        args, leaves = _leaf_copies(values, upcast, tuple(differentiable), shapes)
        ref_out, ref_lse = attention_reference(args["q"], args["k"], args["v"], attn_mask=args["attn_mask"],
                                               alibi_slopes=args["alibi_slopes"], sinks=args["sinks"],
                                               upcast=upcast, **options)
        return ref_out, ref_lse, leaves

    ref, base, forward = _forward_checks(out, lse, reference, spec.softcap, placed)
    failures += forward
    if not grads:
        return failures

    mask64 = None if values["attn_mask"] is None else values["attn_mask"].to(torch.float64)
    if mask64 is not None and values["attn_mask"].dtype == torch.bool:
        mask64 = values["attn_mask"]
    absorbing = _absorbing_rows(mask64, (b, hq, lq, lk), spec.causal, tuple(spec.window))
    if spec.sinks is not None:
        absorbing[:] = False  # a sink keeps the LSE finite and ordinary

    def bounds_of(go_full, glse_full):
        args64 = {n: (None if values[n] is None else (values[n] if values[n].dtype == torch.bool
                                                      else values[n].to(torch.float64)).expand(shapes[n]))
                  for n in values}
        return noise_bounds(args64["q"], args64["k"], args64["v"], out.detach().cpu().to(torch.float64),
                            go_full.to(torch.float64), None if glse_full is None else glse_full.to(torch.float64),
                            args64["attn_mask"], args64["alibi_slopes"], args64["sinks"], spec.causal,
                            tuple(spec.window), spec.softcap)

    failures += _backward_failures(spec, device, out, lse, placed, values, ref, base, absorbing, bounds_of)
    return failures


def _cumulative(lengths: tuple) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)


def _run_varlen(spec: VarlenSpec, device) -> list[str]:
    import mfa_hf

    from ..kernels.reference import attention_reference_varlen

    batch = len(spec.lengths_q)
    tq, tk = sum(spec.lengths_q), sum(spec.lengths_k)
    hq, hkv = spec.heads_q, spec.heads_kv
    full = {"B": batch, "H": hq}
    grads = spec.backward
    shapes = {"q": (tq, hq, spec.dim), "k": (tk, hkv, spec.dim), "v": (tk, hkv, spec.dim_v)}
    layouts = {"q": spec.q, "k": spec.k, "v": spec.v}
    values = _random_arguments(spec, shapes, layouts)
    differentiable = {"q", "k", "v"} if grads else set()
    cu_q, cu_k = _cumulative(spec.lengths_q), _cumulative(spec.lengths_k)
    values["cu_seqlens_q"], shapes["cu_seqlens_q"], layouts["cu_seqlens_q"] = (
        cu_q.to(dtype_of(spec.cu_q.dtype)), (batch + 1,), spec.cu_q.layout)
    values["cu_seqlens_k"], shapes["cu_seqlens_k"], layouts["cu_seqlens_k"] = (
        cu_k.to(dtype_of(spec.cu_k.dtype)), (batch + 1,), spec.cu_k.layout)
    _add_vectors(spec, full, values, shapes, layouts)
    if grads and spec.sinks is not None and spec.sinks.requires_grad:
        differentiable.add("sinks")
    placed = _place_all(values, shapes, layouts, device, differentiable, spec.seed)
    arg = {name: None if p is None else p.arg for name, p in placed.items()}
    max_q = max(spec.lengths_q) + spec.extra_max
    max_k = max(spec.lengths_k) + spec.extra_max
    options = dict(causal=spec.causal, window_size=tuple(spec.window), softcap=spec.softcap)
    raised, result, failures = _traced("forward", "fwd", lambda: mfa_hf.flash_attn_varlen_func(
        arg["q"], arg["k"], arg["v"], arg["cu_seqlens_q"], arg["cu_seqlens_k"], max_q, max_k,
        alibi_slopes=arg["alibi_slopes"], sinks=arg["sinks"], return_lse=True, **options))
    if raised:
        return failures
    out, lse = result

    def reference(upcast: bool):
        floats = {n: values[n] for n in ("q", "k", "v", "alibi_slopes", "sinks")}
        args, leaves = _leaf_copies(floats, upcast, tuple(differentiable), shapes)
        ref_out, ref_lse = attention_reference_varlen(
            args["q"], args["k"], args["v"], cu_q, cu_k, alibi_slopes=args["alibi_slopes"], sinks=args["sinks"],
            upcast=upcast, **options)
        return ref_out, ref_lse, leaves

    ref, base, forward = _forward_checks(out, lse, reference, spec.softcap, placed)
    failures += forward
    if not grads:
        return failures

    def bounds_of(go_full, glse_full):
        return _varlen_bounds(spec, values, shapes, out.detach().cpu().to(torch.float64), go_full, glse_full,
                              cu_q, cu_k)

    failures += _backward_failures(spec, device, out, lse, placed, values, ref, base, None, bounds_of)
    return failures


def _varlen_bounds(spec: VarlenSpec, values, shapes, out64, go_full, glse_full, cu_q, cu_k) -> dict:
    """noise_bounds per sequence, written into packed tensors (sinks: summed over sequences)."""
    q, k, v = (values[n].to(torch.float64).expand(shapes[n]) for n in ("q", "k", "v"))
    bounds = {"q": torch.zeros(q.shape, dtype=torch.float64), "k": torch.zeros(k.shape, dtype=torch.float64),
              "v": torch.zeros(v.shape, dtype=torch.float64)}
    sinks = None if values["sinks"] is None else values["sinks"].to(torch.float64).expand(shapes["sinks"])
    slopes = None if values["alibi_slopes"] is None else values["alibi_slopes"].to(torch.float64).expand(
        shapes["alibi_slopes"])
    if sinks is not None:
        bounds["sinks"] = torch.zeros(sinks.shape, dtype=torch.float64)
    go = go_full.to(torch.float64)
    for seq, (qs, qe, ks, ke) in enumerate(zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:])):
        if qe == qs:
            continue
        seq_slopes = None if slopes is None else (slopes[seq] if slopes.dim() == 2 else slopes)
        glse = None if glse_full is None else glse_full[None, :, qs:qe].to(torch.float64)
        part = noise_bounds(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], out64[None, qs:qe], go[None, qs:qe], glse,
                            None, seq_slopes, sinks, spec.causal, tuple(spec.window), spec.softcap)
        bounds["q"][qs:qe] = part["q"][0]
        bounds["k"][ks:ke] = part["k"][0]
        bounds["v"][ks:ke] = part["v"][0]
        if sinks is not None:
            bounds["sinks"] += part["sinks"]
    return bounds


def _run_kvcache(spec: KVCacheSpec, device) -> list[str]:
    import mfa_hf

    from ..kernels.reference import attention_reference

    batch, lq, new, hq, hkv = spec.batch, spec.lq, spec.new, spec.heads_q, spec.heads_kv
    appending = new > 0 and spec.seqlens != "none"
    new = new if appending else 0
    lengths = list(spec.lengths)
    if spec.seqlens == "int":
        lengths = [lengths[0]] * batch
    if spec.seqlens == "none":
        lengths = [spec.capacity] * batch
    if spec.seqlens == "tensor" and spec.seqlens_index.layout.expand:
        lengths = [lengths[0]] * batch  # one stored length, expanded
    rows = list(spec.batch_idx) if spec.batch_idx is not None else list(range(batch))
    if spec.batch_idx is not None and spec.batch_idx_index.layout.expand:
        if appending:
            raise ValueError("KVCacheSpec: an expanded cache_batch_idx repeats a row, which appending forbids")
        rows = [rows[0]] * batch
    cache_rows = spec.cache_rows if spec.batch_idx is not None else batch
    shapes = {"q": (batch, lq, hq, spec.dim), "k_cache": (cache_rows, spec.capacity, hkv, spec.dim),
              "v_cache": (cache_rows, spec.capacity, hkv, spec.dim_v)}
    layouts = {"q": spec.q, "k_cache": spec.k_cache, "v_cache": spec.v_cache}
    if appending:
        shapes.update(k=(batch, new, hkv, spec.dim), v=(batch, new, hkv, spec.dim_v))
        layouts.update(k=spec.k_new, v=spec.v_new)
    values = _random_arguments(spec, shapes, layouts)
    _add_vectors(spec, {"B": batch, "H": hq}, values, shapes, layouts, alibi_stream="alibi_slopes")
    if spec.seqlens == "tensor":
        layout = spec.seqlens_index.layout
        values["cache_seqlens"] = torch.tensor(lengths[:1] if layout.expand else lengths,
                                               dtype=dtype_of(spec.seqlens_index.dtype))
        shapes["cache_seqlens"], layouts["cache_seqlens"] = (batch,), layout
    if spec.batch_idx is not None:
        layout = spec.batch_idx_index.layout
        values["cache_batch_idx"] = torch.tensor(rows[:1] if layout.expand else rows,
                                                 dtype=dtype_of(spec.batch_idx_index.dtype))
        shapes["cache_batch_idx"], layouts["cache_batch_idx"] = (batch,), layout
    placed = _place_all(values, shapes, layouts, device, set(), spec.seed)
    arg = {name: None if placed.get(name) is None else placed[name].arg
           for name in ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens", "cache_batch_idx", "alibi_slopes",
                        "sinks")}
    seqlens = {"tensor": arg["cache_seqlens"], "int": lengths[0], "none": None}[spec.seqlens]
    raised, result, failures = _traced("call", "decode", lambda: mfa_hf.flash_attn_with_kvcache(
        arg["q"], arg["k_cache"], arg["v_cache"], arg["k"], arg["v"], cache_seqlens=seqlens,
        cache_batch_idx=arg["cache_batch_idx"], causal=spec.causal, window_size=tuple(spec.window),
        softcap=spec.softcap, alibi_slopes=arg["alibi_slopes"], sinks=arg["sinks"], return_lse=True,
        num_splits=spec.num_splits))
    if raised:
        return failures
    out, lse = result
    expected = {side: _appended_cache(values, shapes, side, rows, lengths, new if appending else None)
                for side in ("k", "v")}
    totals = [n + new for n in lengths]
    refs = {}
    for upcast in (True, False):
        cast = (lambda t: None if t is None else t.to(torch.float64)) if upcast else (lambda t: t)
        slopes = None if values["alibi_slopes"] is None else values["alibi_slopes"].expand(shapes["alibi_slopes"])
        sinks = None if values["sinks"] is None else cast(values["sinks"].expand(shapes["sinks"]))
        outs, lses = [], []
        for bi, (row, total) in enumerate(zip(rows, totals)):
            seq_slopes = None if slopes is None else cast(slopes[bi] if slopes.dim() == 2 else slopes)
            o, l = attention_reference(
                cast(values["q"].expand(shapes["q"])[bi: bi + 1]), cast(expected["k"][row: row + 1, :total]),
                cast(expected["v"][row: row + 1, :total]), causal=spec.causal, window_size=tuple(spec.window),
                softcap=spec.softcap, alibi_slopes=seq_slopes, sinks=sinks, upcast=upcast)
            outs.append(o)
            lses.append(l)
        refs[upcast] = (torch.cat(outs), torch.cat(lses))
    failures += _forward_failures(out, lse, refs[True], refs[False], spec.softcap)
    for side in ("k", "v"):
        failures += _cache_failures(side, placed[f"{side}_cache"], expected[side], appending)
    failures += _inputs_unchanged({n: p for n, p in placed.items() if n not in ("k_cache", "v_cache")}, "call")
    return failures


def _appended_cache(values: dict, shapes: dict, side: str, rows: list, lengths: list, new: int | None):
    """The whole k or v cache (compact values) as it should be after the call (new: None without an append)."""
    cache = values[f"{side}_cache"].expand(shapes[f"{side}_cache"]).clone()
    if new is not None:
        for bi, row in enumerate(rows):
            cache[row, lengths[bi]: lengths[bi] + new] = values[side].expand(shapes[side])[bi]
    return cache


def _cache_failures(side: str, cache: Placed, expected: torch.Tensor, appending: bool) -> list[str]:
    """The cache's buffer holds exactly the appended tokens: the rest of the view and its gaps unchanged."""
    want = cache.snapshot.cpu().clone()
    if appending:
        chain(want, compact_shape(cache.shape, cache.layout), cache.layout).copy_(expected)
    if torch.equal(bits(cache.flat.cpu()), bits(want)):
        return []
    got = chain(cache.flat.cpu(), compact_shape(cache.shape, cache.layout), cache.layout)
    inside = (bits(got) != bits(expected)).sum() if appending else "n/a"
    return [f"{side}_cache ({cache.layout.name}): its buffer after the call differs from the expected append "
            f"({inside} elements of the cache view differ; the rest are gaps or the buffer's ends)"]
