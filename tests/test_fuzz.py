"""Hypothesis fuzz: random shapes and flags against the float64 reference."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mfa_hf.testing import Case, check_against_reference


@st.composite
def cases(draw):
    heads_kv = draw(st.sampled_from([1, 2, 3]))
    window = draw(st.sampled_from([(-1, -1), (0, 0), (3, -1), (-1, 2), (4, 1)]))
    return Case(
        dtype=draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32])),
        batch=draw(st.integers(1, 3)),
        lq=draw(st.integers(1, 40)),
        lk=draw(st.integers(1, 40)),
        heads_q=heads_kv * draw(st.integers(1, 3)),
        heads_kv=heads_kv,
        dim=draw(st.integers(1, 72)),
        dim_v=draw(st.integers(1, 72)),
        causal=draw(st.booleans()),
        window=window,
        softcap=draw(st.sampled_from([0.0, 0.0, 1.5, 20.0])),
        sinks=draw(st.booleans()),
        alibi=draw(st.booleans()),
        mask=draw(st.sampled_from(["none", "none", "bool", "additive"])),
        strided=draw(st.booleans()),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases(), seed=st.integers(0, 2**16))
def test_random_problems_match_reference(case, seed, small_tiles):
    check_against_reference(case, backend="torch", seed=seed)
