"""Hypothesis strategies: every argument's layout and dtype drawn at once (hypothesis is a test
dependency: imported inside the functions, not at the module's top)."""

from __future__ import annotations

from .layouts import FLOAT_NAMES, INT_NAMES, KERNEL_DTYPES, Layout
from .specs import FULL_DIMS, DenseSpec, IndexSpec, KVCacheSpec, MaskSpec, VarlenSpec, VectorSpec
from .targets import MASK_FILLS


def layouts(rank: int, expandable: tuple = ()):
    """Any memory order, steps of 1-3 per dim, an offset, and stride 0 over some of `expandable`."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw):
        order = tuple(draw(st.permutations(range(rank)))) if rank > 1 and draw(st.booleans()) else ()
        steps = tuple(draw(st.sampled_from((1, 1, 2, 3))) for _ in range(rank)) if draw(st.booleans()) else ()
        offset = draw(st.sampled_from((0, 0, 1, 3, 8)))
        expand = ()
        if expandable and draw(st.booleans()):
            expand = tuple(sorted(draw(st.sets(st.sampled_from(tuple(expandable)), min_size=1))))
        return Layout(order, steps, offset, expand)

    return build()


def _rarely():
    from hypothesis import strategies as st

    return st.sampled_from((False,) * 9 + (True,))  # st.integers(0, 9) == 0 would favour its bound, 0


def _sizes(backend: str) -> dict:
    """Shape bounds: the triton interpreter pays per program instance, so it gets fewer and smaller."""
    if backend == "triton":
        return dict(batch=2, group=2, length=20, dim=24, sequences=3, seq_length=10)
    return dict(batch=3, group=3, length=24, dim=40, sequences=4, seq_length=12)


def _options(draw):
    from hypothesis import strategies as st

    return dict(causal=draw(st.booleans()),
                window=draw(st.sampled_from(((-1, -1), (-1, -1), (0, 0), (3, -1), (-1, 2), (4, 1)))),
                softcap=draw(st.sampled_from((0.0, 0.0, 1.5, 20.0))))


def _vector_spec(draw, dims_choices, requires_grad=True):
    from hypothesis import strategies as st

    dims = draw(st.sampled_from(dims_choices))
    return VectorSpec(draw(st.sampled_from(FLOAT_NAMES)), draw(layouts(len(dims), tuple(range(len(dims))))), dims,
                      requires_grad=requires_grad and draw(st.booleans()))


def _mask_spec(draw):
    from hypothesis import strategies as st

    broadcast = [draw(st.booleans()) for _ in range(4)]
    leading = next((d for d, b in enumerate(broadcast) if not b), 4)
    rank = draw(st.integers(max(2, 4 - leading), 4))
    dims = tuple("1" if b else name for b, name in zip(broadcast, FULL_DIMS))[4 - rank:]
    ones = tuple(j for j, d in enumerate(dims) if d == "1")
    return MaskSpec(draw(st.sampled_from(("bool", "bool") + FLOAT_NAMES)), dims, draw(layouts(rank, ones)),
                    draw(st.sampled_from(MASK_FILLS)), draw(st.booleans()), draw(st.booleans()))


def dense_specs(backend: str = "torch"):
    from hypothesis import strategies as st

    size = _sizes(backend)
    dtypes = KERNEL_DTYPES + (("float64",) if backend == "torch" else ())

    @st.composite
    def build(draw):
        heads_kv = draw(st.integers(1, 2))
        nan_q = draw(_rarely())
        return DenseSpec(
            dtype=draw(st.sampled_from(dtypes)), batch=draw(st.integers(1, size["batch"])),
            lq=draw(st.integers(0, size["length"])), lk=draw(st.integers(0, size["length"])),
            heads_q=heads_kv * draw(st.integers(1, size["group"])), heads_kv=heads_kv,
            dim=draw(st.integers(1, size["dim"])), dim_v=draw(st.integers(1, size["dim"])), **_options(draw),
            q=draw(layouts(4, (0, 2))), k=draw(layouts(4, (0, 2))), v=draw(layouts(4, (0, 2))),
            mask=draw(st.one_of(st.none(), st.composite(_mask_spec)())),
            alibi=draw(st.one_of(st.none(), st.composite(lambda d: _vector_spec(d, (("H",), ("B", "H")), False))())),
            sinks=draw(st.one_of(st.none(), st.composite(lambda d: _vector_spec(d, (("H",),)))())),
            backward=not nan_q and draw(st.sampled_from((True, True, False))),
            grad_out=draw(layouts(4, (0, 1, 2, 3))), grad_lse=draw(st.one_of(st.none(), layouts(3, (0, 1, 2)))),
            nan_q=nan_q, seed=draw(st.integers(0, 2**16)))

    return build()


def varlen_specs(backend: str = "torch"):
    from hypothesis import strategies as st

    size = _sizes(backend)
    dtypes = KERNEL_DTYPES + (("float64",) if backend == "torch" else ())

    @st.composite
    def build(draw):
        batch = draw(st.integers(1, size["sequences"]))
        lengths = st.lists(st.integers(0, size["seq_length"]), min_size=batch, max_size=batch).map(tuple)
        heads_kv = draw(st.integers(1, 2))
        return VarlenSpec(
            dtype=draw(st.sampled_from(dtypes)), lengths_q=draw(lengths), lengths_k=draw(lengths),
            heads_q=heads_kv * draw(st.integers(1, size["group"])), heads_kv=heads_kv,
            dim=draw(st.integers(1, size["dim"])), dim_v=draw(st.integers(1, size["dim"])), **_options(draw),
            extra_max=draw(st.sampled_from((0, 0, 3))),
            q=draw(layouts(3, (0, 1))), k=draw(layouts(3, (0, 1))), v=draw(layouts(3, (0, 1))),
            cu_q=IndexSpec(draw(st.sampled_from(INT_NAMES)), draw(layouts(1))),
            cu_k=IndexSpec(draw(st.sampled_from(INT_NAMES)), draw(layouts(1))),
            alibi=draw(st.one_of(st.none(), st.composite(lambda d: _vector_spec(d, (("H",), ("B", "H")), False))())),
            sinks=draw(st.one_of(st.none(), st.composite(lambda d: _vector_spec(d, (("H",),)))())),
            backward=draw(st.sampled_from((True, True, False))),
            grad_out=draw(layouts(3, (0, 1, 2))), grad_lse=draw(st.one_of(st.none(), layouts(2, (0, 1)))),
            seed=draw(st.integers(0, 2**16)))

    return build()


def kvcache_specs(backend: str = "torch"):
    from hypothesis import strategies as st

    size = _sizes(backend)

    @st.composite
    def build(draw):
        batch = draw(st.integers(1, size["batch"]))
        seqlens = draw(st.sampled_from(("tensor", "tensor", "int", "none")))
        new = 0 if seqlens == "none" else draw(st.integers(0, 3))
        capacity = draw(st.integers(max(1, new), size["length"]))
        lengths = tuple(draw(st.lists(st.integers(0, capacity - new), min_size=batch, max_size=batch)))
        use_idx = draw(st.booleans())
        cache_rows = batch + (draw(st.integers(0, 2)) if use_idx else 0)
        rows = tuple(draw(st.permutations(range(cache_rows)))[:batch]) if use_idx else None
        heads_kv = draw(st.integers(1, 2))
        cache_expand = (0, 2) if new == 0 else ()
        return KVCacheSpec(
            dtype=draw(st.sampled_from(KERNEL_DTYPES)), lq=draw(st.integers(1, 4)), new=new,
            heads_q=heads_kv * draw(st.integers(1, size["group"])), heads_kv=heads_kv,
            dim=draw(st.integers(1, size["dim"])), dim_v=draw(st.integers(1, size["dim"])), capacity=capacity,
            lengths=lengths, cache_rows=cache_rows, **_options(draw), num_splits=draw(st.sampled_from((0, 0, 1, 2, 5))),
            q=draw(layouts(4, (0, 2))), k_cache=draw(layouts(4, cache_expand)), v_cache=draw(layouts(4, cache_expand)),
            k_new=draw(layouts(4, (0, 1, 2))), v_new=draw(layouts(4, (0, 1, 2))), seqlens=seqlens,
            seqlens_index=IndexSpec(draw(st.sampled_from(INT_NAMES)), draw(layouts(1, (0,)))),
            batch_idx=rows, batch_idx_index=IndexSpec(draw(st.sampled_from(INT_NAMES)),
                                                      draw(layouts(1, (0,) if new == 0 else ()))),
            alibi=draw(st.one_of(st.none(), st.composite(lambda d: _vector_spec(d, (("H",), ("B", "H")), False))())),
            sinks=draw(st.one_of(st.none(), st.composite(lambda d: _vector_spec(d, (("H",),), False))())),
            nan_q=draw(_rarely()), seed=draw(st.integers(0, 2**16)))

    return build()


STRATEGIES = {"dense": dense_specs, "varlen": varlen_specs, "kvcache": kvcache_specs}
