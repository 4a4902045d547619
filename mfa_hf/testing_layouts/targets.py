"""The targeted cases: one argument at a time in each layout and dtype, and the semantic cases."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .layouts import CONTIGUOUS, FLOAT_NAMES, INT_NAMES, KERNEL_DTYPES, Layout, named_layout
from .specs import DenseSpec, IndexSpec, KVCacheSpec, MaskSpec, VarlenSpec, VectorSpec


@dataclass(frozen=True)
class Target:
    """A named case. core (the CORE ids): in the default run of every backend, triton's interpreter
    included; slow: only under --run-slow, on every backend (the rest of a product whose rotation runs
    by default). The others run by default on torch and metal, under --run-slow on triton."""

    id: str
    spec: object
    core: bool = False
    slow: bool = False
    backends: tuple = ("torch", "metal", "triton")


MASK_ORDER = {4: (0, 1, 3, 2), 3: (0, 2, 1), 2: (1, 0)}
MASK_DIMS = (("B", "H", "Lq", "Lk"), ("B", "1", "Lq", "Lk"), ("1", "1", "Lq", "Lk"), ("Lq", "Lk"),
             ("B", "1", "1", "Lk"), ("1", "H", "Lq", "Lk"))
MASK_FILLS = ("-inf", "finfo.min", "finfo32.min")
LAYOUT_KINDS = ("contiguous", "transposed", "sliced", "offset", "expanded", "mixed")


def _mask_layout(kind: str, dims: tuple) -> Layout:
    ones = tuple(j for j, d in enumerate(dims) if d == "1")
    return named_layout(kind, len(dims), ones if kind in ("expanded", "mixed") else (), MASK_ORDER[len(dims)])


def _dense_targets() -> list[Target]:
    targets = []
    qkv = (("transposed", ()), ("permuted", ()), ("sliced", ()), ("offset", ()), ("expanded", (0,)),
           ("expanded", (2,)), ("mixed", (0,)))
    for a, name in enumerate(("q", "k", "v")):
        for n, (kind, expand) in enumerate(qkv):
            layout = named_layout(kind, 4, expand)
            spec = DenseSpec(dtype=KERNEL_DTYPES[(n + a) % 3], causal=n % 2 == 1, **{name: layout})
            targets.append(Target(f"dense-{name}-{layout.name}-{spec.dtype}", spec))
    n = 0  # bool masks: every broadcast shape x layout (half of them by default)
    for d, dims in enumerate(MASK_DIMS):
        for k, kind in enumerate(LAYOUT_KINDS):
            if kind == "expanded" and "1" not in dims:
                continue
            mask = MaskSpec("bool", dims, _mask_layout(kind, dims))
            spec = DenseSpec(dtype=KERNEL_DTYPES[n % 3], causal=n % 4 == 1, mask=mask, sinks=VectorSpec() if n % 5 == 2
                             else None)
            slow = (d + k) % 2 == 1
            targets.append(Target(f"dense-attn_mask-{mask.name}", spec, slow=slow))
            n += 1
    n = 0  # additive masks: dtype x layout x fill (the fills rotated by default)
    for t, mask_dtype in enumerate(FLOAT_NAMES):
        for k, kind in enumerate(LAYOUT_KINDS):
            for f, fill in enumerate(MASK_FILLS):
                dims = MASK_DIMS[(t + k + f) % len(MASK_DIMS)]
                if kind == "expanded" and "1" not in dims:
                    dims = ("B", "1", "Lq", "Lk")
                mask = MaskSpec(mask_dtype, dims, _mask_layout(kind, dims), fill)
                spec = DenseSpec(dtype=KERNEL_DTYPES[n % 3], causal=n % 4 == 3, mask=mask)
                slow = f != (t + k) % 3
                targets.append(Target(f"dense-attn_mask-{mask.name}", spec, slow=slow))
                n += 1
    n = 0  # alibi slopes: shape x layout x dtype (dtypes rotated by default)
    for dims, kinds in ((("H",), ("contiguous", "sliced", "offset", "expanded")),
                        (("B", "H"), ("contiguous", "transposed", "sliced", "offset", "expanded", "expanded1",
                                      "mixed"))):
        for k, kind in enumerate(kinds):
            for t, dt in enumerate(FLOAT_NAMES):
                expand = (1,) if kind == "expanded1" else (0,) if kind in ("expanded", "mixed") else ()
                layout = named_layout(kind.rstrip("1"), len(dims), expand)
                alibi = VectorSpec(dt, layout, dims)
                spec = DenseSpec(dtype=KERNEL_DTYPES[n % 3], causal=n % 2 == 0, alibi=alibi)
                slow = t != (k + len(dims)) % 4
                targets.append(Target(f"dense-alibi_slopes-{alibi.name}", spec, slow=slow))
                n += 1
    for n, (k, kind, t, dt) in enumerate((k, kind, t, dt) for k, kind in enumerate(("contiguous", "sliced", "offset",
                                                                                   "expanded"))
                                         for t, dt in enumerate(FLOAT_NAMES)):
        sinks = VectorSpec(dt, named_layout(kind, 1, (0,) if kind == "expanded" else ()))
        spec = DenseSpec(dtype=KERNEL_DTYPES[n % 3], causal=n % 2 == 1, sinks=sinks, grad_lse=CONTIGUOUS)
        slow = (t - k) % 2 == 1
        targets.append(Target(f"dense-sinks-{sinks.name}", spec, slow=slow))
    for n, (kind, expand) in enumerate((("transposed", ()), ("permuted", ()), ("sliced", ()), ("offset", ()),
                                        ("expanded", (0, 1, 2, 3)), ("mixed", (0,)))):
        layout = named_layout(kind, 4, expand)
        spec = DenseSpec(dtype=KERNEL_DTYPES[n % 3], sinks=VectorSpec() if n % 2 else None, grad_out=layout)
        targets.append(Target(f"dense-grad_out-{layout.name}-{spec.dtype}", spec))
    for n, (kind, expand) in enumerate((("transposed", ()), ("sliced", ()), ("offset", ()), ("expanded", (0, 1, 2)))):
        layout = named_layout(kind, 3, expand, order=(0, 2, 1))
        spec = DenseSpec(dtype=KERNEL_DTYPES[n % 3], sinks=VectorSpec(), grad_lse=layout)
        targets.append(Target(f"dense-grad_lse-{layout.name}-{spec.dtype}", spec))
    for kind in ("transposed", "mixed"):
        layout = named_layout(kind, 4, (0,) if kind == "mixed" else ())
        spec = DenseSpec(dtype="float64", q=layout, k=layout, v=layout, sinks=VectorSpec("float64"),
                         mask=MaskSpec("float64", ("B", "1", "Lq", "Lk"), _mask_layout(kind, ("B", "1", "Lq", "Lk"))),
                         grad_lse=CONTIGUOUS)
        targets.append(Target(f"dense-qkv_float64-{layout.name}", spec, backends=("torch",)))
    return targets


def _semantic_targets() -> list[Target]:
    targets = []
    for dt in KERNEL_DTYPES:
        targets.append(Target(f"semantics-nan_q-plain-{dt}", DenseSpec(dtype=dt, nan_q=True)))
        targets.append(Target(f"semantics-nan_q-causal_no_key_rows_sinks-{dt}",
                              DenseSpec(dtype=dt, lq=9, lk=5, causal=True, sinks=VectorSpec(), nan_q=True, seed=1)))
        targets.append(Target(f"semantics-nan_q-bool_mask_empty_rows-{dt}",
                              DenseSpec(dtype=dt, mask=MaskSpec("bool"), nan_q=True, seed=2)))
    # A row masked everywhere by finfo(float32).min averages V (the additive mask is added exactly).
    for n, (mask_dtype, fill) in enumerate((("float32", "finfo32.min"), ("bfloat16", "finfo.min"),
                                            ("float64", "finfo32.min"), ("float16", "finfo.min"))):
        mask = MaskSpec(mask_dtype, ("B", "1", "Lq", "Lk"), fill=fill)
        spec = DenseSpec(dtype=KERNEL_DTYPES[n % 3], mask=mask, seed=3)
        targets.append(Target(f"semantics-finfo_min_row_mean_of_v-{mask_dtype}-{fill}-{spec.dtype}", spec))
    # A padding mask as transformers writes it: (B, 1, 1, Lk), finfo.min over padded keys; one sequence
    # padded entirely (every row of it averages V).
    mask = MaskSpec("float32", ("B", "1", "1", "Lk"), fill="finfo.min")
    targets.append(Target("semantics-finfo_min_padding_mask-float32", DenseSpec(mask=mask, seed=4)))
    for sinks in (None, VectorSpec()):
        spec = DenseSpec(mask=MaskSpec("bool"), sinks=sinks, grad_lse=CONTIGUOUS, seed=5)
        targets.append(Target(f"semantics-bool_empty_row_zero{'-sinks' if sinks else ''}", spec))
    for dt in ("float32", "float16"):
        spec = DenseSpec(dtype=dt, lk=0, sinks=VectorSpec(), grad_lse=CONTIGUOUS)
        targets.append(Target(f"semantics-lk0_sinks_grad-{dt}", spec))
    targets.append(Target("semantics-lk0_no_sinks", DenseSpec(lk=0, grad_lse=CONTIGUOUS)))
    targets.append(Target("semantics-lq0_sinks", DenseSpec(lq=0, sinks=VectorSpec(), grad_lse=CONTIGUOUS)))
    spec = DenseSpec(lq=9, lk=4, causal=True, sinks=VectorSpec(), grad_lse=CONTIGUOUS)
    targets.append(Target("semantics-causal_rows_without_keys_sinks_grad_lse", spec))
    # softcap 50 (Gemma 2's) in float32: the cap multiplies any absolute error of tanh(s / cap) by 50
    # (found by the fuzz on triton, whose tanh is 1 - 2 / (e^2x + 1)).
    targets.append(Target("semantics-softcap50-float32", DenseSpec(softcap=50.0, seed=1)))
    return targets


def _varlen_targets() -> list[Target]:
    targets = []
    kinds = (("contiguous", "int64"), ("sliced", "int32"), ("sliced", "int64"), ("offset", "int32"),
             ("offset", "int64"), ("mixed", "int32"))
    for name in ("cu_q", "cu_k"):
        for n, (kind, dt) in enumerate(kinds):
            index = IndexSpec(dt, named_layout(kind, 1))
            spec = VarlenSpec(dtype=KERNEL_DTYPES[n % 3], causal=n % 2 == 0, **{name: index})
            api_name = {"cu_q": "cu_seqlens_q", "cu_k": "cu_seqlens_k"}[name]
            targets.append(Target(f"varlen-{api_name}-{index.name}", spec))
    qkv = (("transposed", ()), ("permuted", ()), ("sliced", ()), ("offset", ()), ("expanded", (1,)))
    for a, name in enumerate(("q", "k", "v")):
        for n, (kind, expand) in enumerate(qkv):
            layout = named_layout(kind, 3, expand)
            spec = VarlenSpec(dtype=KERNEL_DTYPES[(n + a) % 3], causal=n % 2 == 1, **{name: layout})
            targets.append(Target(f"varlen-{name}-{layout.name}-{spec.dtype}", spec))
    for n, (dims, kind, dt) in enumerate(((("B", "H"), "transposed", "float32"), (("B", "H"), "expanded", "float64"),
                                          (("B", "H"), "sliced", "float16"), (("H",), "offset", "float64"))):
        alibi = VectorSpec(dt, named_layout(kind, len(dims), (0,) if kind == "expanded" else ()), dims)
        targets.append(Target(f"varlen-alibi_slopes-{alibi.name}",
                              VarlenSpec(dtype=KERNEL_DTYPES[n % 3], causal=True, alibi=alibi)))
    for n, (kind, dt) in enumerate((("sliced", "float32"), ("sliced", "float64"), ("offset", "float16"),
                                    ("expanded", "bfloat16"))):
        sinks = VectorSpec(dt, named_layout(kind, 1, (0,) if kind == "expanded" else ()))
        targets.append(Target(f"varlen-sinks-{sinks.name}",
                              VarlenSpec(dtype=KERNEL_DTYPES[n % 3], sinks=sinks, grad_lse=CONTIGUOUS)))
    for n, (kind, expand) in enumerate((("transposed", ()), ("sliced", ()), ("expanded", (0, 1, 2)))):
        layout = named_layout(kind, 3, expand)
        targets.append(Target(f"varlen-grad_out-{layout.name}", VarlenSpec(dtype=KERNEL_DTYPES[n % 3], grad_out=layout)))
    for kind in ("transposed", "sliced"):
        layout = named_layout(kind, 2)
        targets.append(Target(f"varlen-grad_lse-{layout.name}", VarlenSpec(sinks=VectorSpec(), grad_lse=layout)))
    # Sequences without keys (and without queries): the sink's gradient still flows through the LSE.
    for dt in ("float32", "bfloat16"):
        spec = VarlenSpec(dtype=dt, lengths_q=(3, 4, 0, 5), lengths_k=(0, 6, 2, 0), sinks=VectorSpec(),
                          grad_lse=CONTIGUOUS)
        targets.append(Target(f"semantics-varlen_empty_keys_sinks_grad-{dt}", spec))
    targets.append(Target("varlen-extra_max_seqlen", VarlenSpec(extra_max=5, causal=True)))
    # Every row sees one key (P = 1, dV = dO): found by the fuzz on triton's interpreter, whose float32 ->
    # bfloat16 cast truncates, so P.to(bfloat16) before dV = P^T dO gives 0.99609375 for P = 0.99999.
    spec = VarlenSpec(dtype="bfloat16", lengths_q=(3, 9, 4), lengths_k=(3, 9, 4), heads_q=2, dim=24, dim_v=23,
                      causal=True, window=(0, 0), q=Layout(expand=(0, 1)), seed=1)
    targets.append(Target("varlen-q-expanded01-bfloat16-one_key_per_row", spec))
    # Every key token one row (k expanded along the tokens): attention is uniform, the per-token dK cancel in
    # pairs to about 0, and autograd sums them after the call rounded each to bfloat16 (found by the long fuzz on
    # metal and torch alike: the harness's bound lacked that rounding, run._expanded_rounding).
    spec = VarlenSpec(dtype="bfloat16", lengths_q=(6, 1, 12), lengths_k=(2, 7, 2), heads_q=1, heads_kv=1, dim=2,
                      dim_v=24, k=Layout(offset=8, expand=(0,)), v=Layout(order=(0, 2, 1), offset=8),
                      cu_q=IndexSpec("int32", Layout(steps=(1,))), seed=1)
    targets.append(Target("varlen-k-expanded0-bfloat16-identical_keys", spec))
    return targets


def _kvcache_targets() -> list[Target]:
    targets = []
    batch_idx = dict(batch_idx=(4, 0, 2), cache_rows=5)
    q_kinds = (("transposed", ()), ("permuted", ()), ("sliced", ()), ("offset", ()), ("expanded", (0,)))
    for n, (kind, expand) in enumerate(q_kinds):
        layout = named_layout(kind, 4, expand)
        spec = KVCacheSpec(dtype=KERNEL_DTYPES[n % 3], lq=1 + 2 * (n % 2), q=layout)
        targets.append(Target(f"kvcache-q-{layout.name}-{spec.dtype}", spec))
    cache_kinds = ("transposed", "permuted", "sliced", "offset", "mixed")
    for a, name in enumerate(("k_cache", "v_cache")):
        for n, kind in enumerate(cache_kinds):
            layout = named_layout(kind, 4)
            spec = KVCacheSpec(dtype=KERNEL_DTYPES[(n + a) % 3], lq=1 + (n % 2), new=1 + (n % 2),
                               **({name: layout}), **(batch_idx if n == 4 else {}))
            targets.append(Target(f"kvcache-{name}-{layout.name}-{spec.dtype}", spec))
        layout = named_layout("expanded", 4, (0,))
        spec = KVCacheSpec(new=0, seqlens="none", **{name: layout})
        targets.append(Target(f"kvcache-{name}-{layout.name}-no_append", spec))
    # Every row the same length and one query row: the CPU's fused decode (kernels/torch/cpu_fused_decode.py), which
    # hands its operands to an aten kernel that reads the last dim as unit-stride; D_v != D_qk must not reach it.
    same = dict(lq=1, lengths=(9, 9, 9))
    for a, name in enumerate(("q", "k_cache", "v_cache")):
        for n, (kind, expand) in enumerate((("permuted", ()), ("sliced", ()), ("expanded", (3,)), ("mixed", ()))):
            layout = named_layout(kind, 4, expand)
            spec = KVCacheSpec(dtype=KERNEL_DTYPES[(n + a) % 3], new=n % 2, **same, **{name: layout})
            targets.append(Target(f"kvcache-{name}-{layout.name}-{spec.dtype}-same_lengths", spec))
    for n, seqlens in enumerate(("tensor", "int", "none")):
        spec = KVCacheSpec(dtype=KERNEL_DTYPES[n], dim_v=8, new=0, seqlens=seqlens, lq=1, lengths=(24, 24, 24))
        targets.append(Target(f"kvcache-dim_v-8-{seqlens}-same_lengths", spec))
    for name in ("k_new", "v_new"):
        for n, (kind, expand) in enumerate((("transposed", ()), ("sliced", ()), ("offset", ()), ("expanded", (2,)))):
            layout = named_layout(kind, 4, expand)
            spec = KVCacheSpec(dtype=KERNEL_DTYPES[n % 3], lq=2, new=2, **{name: layout})
            targets.append(Target(f"kvcache-{name.replace('_new', '')}-{layout.name}-{spec.dtype}", spec))
    # With an append the API computes lengths + new (a fresh tensor); without one the argument itself
    # reaches the kernel, so both are cases.
    for n, (kind, dt, new) in enumerate((k, d, new) for k in ("contiguous", "sliced", "offset", "expanded")
                                        for d in INT_NAMES for new in (1, 0)):
        index = IndexSpec(dt, named_layout(kind, 1, (0,) if kind == "expanded" else ()))
        spec = KVCacheSpec(dtype=KERNEL_DTYPES[n % 3], seqlens_index=index, new=new,
                           lengths=(7, 7, 7) if kind == "expanded" else (0, 9, 20))
        targets.append(Target(f"kvcache-cache_seqlens-{index.name}{'' if new else '-no_append'}", spec))
    targets.append(Target("kvcache-cache_seqlens-int", KVCacheSpec(seqlens="int", lengths=(11, 11, 11))))
    targets.append(Target("kvcache-cache_seqlens-none", KVCacheSpec(seqlens="none", new=0)))
    for n, (kind, dt, new) in enumerate((k, d, new) for k in ("contiguous", "sliced", "offset") for d in INT_NAMES
                                        for new in (1, 0)):
        index = IndexSpec(dt, named_layout(kind, 1))
        spec = KVCacheSpec(dtype=KERNEL_DTYPES[n % 3], batch_idx_index=index, new=new, **batch_idx)
        targets.append(Target(f"kvcache-cache_batch_idx-{index.name}{'' if new else '-no_append'}", spec))
    index = IndexSpec("int64", named_layout("expanded", 1, (0,)))
    targets.append(Target("kvcache-cache_batch_idx-expanded0-int64-no_append",
                          KVCacheSpec(batch_idx_index=index, new=0, **batch_idx)))
    for n, (dims, kind, dt) in enumerate(((("B", "H"), "transposed", "float32"), (("B", "H"), "expanded", "float64"),
                                          (("H",), "sliced", "float64"), (("H",), "offset", "float16"))):
        alibi = VectorSpec(dt, named_layout(kind, len(dims), (0,) if kind == "expanded" else ()), dims)
        targets.append(Target(f"kvcache-alibi_slopes-{alibi.name}", KVCacheSpec(dtype=KERNEL_DTYPES[n % 3], alibi=alibi)))
    for n, (kind, dt) in enumerate((("sliced", "float32"), ("sliced", "float64"), ("offset", "float16"),
                                    ("expanded", "bfloat16"))):
        sinks = VectorSpec(dt, named_layout(kind, 1, (0,) if kind == "expanded" else ()))
        targets.append(Target(f"kvcache-sinks-{sinks.name}", KVCacheSpec(dtype=KERNEL_DTYPES[n % 3], sinks=sinks)))
    mixed = named_layout("mixed", 4)
    spec = KVCacheSpec(lq=3, new=3, window=(5, -1), num_splits=3, q=mixed, k_cache=mixed, v_cache=mixed,
                       k_new=mixed, v_new=mixed, seqlens_index=IndexSpec("int64", named_layout("mixed", 1)),
                       batch_idx_index=IndexSpec("int64", named_layout("sliced", 1)), **batch_idx,
                       alibi=VectorSpec("float64", named_layout("transposed", 2), ("B", "H")),
                       sinks=VectorSpec("float16", named_layout("sliced", 1)))
    targets.append(Target("kvcache-everything_mixed", spec))
    for dt in KERNEL_DTYPES:
        targets.append(Target(f"semantics-kvcache_nan_q-{dt}", KVCacheSpec(dtype=dt, lq=2, nan_q=True)))
    return targets


# What triton's interpreter runs by default (about a second a case): every argument once, the cases
# that found bugs before, and the semantic rules.
CORE = frozenset((
    "dense-q-transposed0213+sliced2111+offset5+expanded0-float16", "dense-k-transposed3210-float32",
    "dense-v-expanded2-bfloat16", "dense-attn_mask-(B,1,Lq,Lk)-transposed0132+sliced2111+offset5+expanded1-bool",
    "dense-attn_mask-(B,H,Lq,Lk)-offset3-float64--inf", "dense-attn_mask-(B,1,Lq,Lk)-sliced3112-float64-finfo32.min",
    "dense-attn_mask-(Lq,Lk)-sliced32-bfloat16--inf", "dense-alibi_slopes-(B,H)-transposed10-float64",
    "dense-alibi_slopes-(B,H)-expanded0-float32", "dense-sinks-(H)-sliced2-float32", "dense-sinks-(H)-expanded0-float16",
    "dense-grad_out-expanded0123-bfloat16", "dense-grad_lse-transposed021-float16",
    "semantics-nan_q-causal_no_key_rows_sinks-bfloat16", "semantics-finfo_min_row_mean_of_v-float32-finfo32.min-float16",
    "semantics-finfo_min_padding_mask-float32", "semantics-bool_empty_row_zero-sinks", "semantics-lk0_sinks_grad-float32",
    "semantics-softcap50-float32",
    "varlen-cu_seqlens_q-sliced2-int32", "varlen-cu_seqlens_k-offset3-int64", "varlen-cu_seqlens_q-contiguous-int64",
    "varlen-k-transposed210-float32", "varlen-alibi_slopes-(B,H)-transposed10-float32", "varlen-sinks-(H)-sliced2-float32",
    "semantics-varlen_empty_keys_sinks_grad-float32", "varlen-q-expanded01-bfloat16-one_key_per_row",
    "kvcache-k_cache-transposed0213+sliced2111+offset5-bfloat16", "kvcache-v_cache-transposed3210-float32",
    "kvcache-k-offset3-float32", "kvcache-cache_seqlens-sliced2-int32-no_append", "kvcache-cache_seqlens-expanded0-int32-no_append",
    "kvcache-cache_batch_idx-sliced2-int32", "kvcache-cache_batch_idx-offset3-int64-no_append",
    "kvcache-alibi_slopes-(B,H)-transposed10-float32",
    "kvcache-sinks-(H)-sliced2-float32", "kvcache-everything_mixed", "semantics-kvcache_nan_q-float16",
))


def targeted_cases() -> list[Target]:
    """Every targeted case (ids unique); `core` marks the CORE ids."""
    targets = _dense_targets() + _semantic_targets() + _varlen_targets() + _kvcache_targets()
    ids = [t.id for t in targets]
    missing = CORE - set(ids)
    if missing or len(set(ids)) != len(ids):
        raise AssertionError(f"targeted_cases: CORE names unknown ids {sorted(missing)} or ids repeat (harness bug)")
    return [replace(t, core=t.id in CORE, slow=t.slow and t.id not in CORE) for t in targets]

