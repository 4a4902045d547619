"""ring_flash_attn_func and ulysses_flash_attn_func on CPU/gloo, 2 and 4 ranks, against the float64
reference of the whole problem (DESIGN.md's tolerance rule), forward and backward.

One pool of 4 gloo ranks serves the whole module (2-rank cases run on the group of ranks 0 and 1).
Fresh random inputs per case. The full matrix is marked slow (--run-slow).
"""

import itertools
import zlib

import pytest
import torch

from mfa_hf.distributed import ring_flash_attn_func
from mfa_hf.distributed.testing import Pool, assert_refused, gather_unwaited, raise_failures
from mfa_hf.distributed.testing_attention import BAD_CALLS, assemble, bad_call, check, cp_case, draw, run_shard

CASES = [
    cp_case("ring", 2, heads_kv=4),
    cp_case("ring", 2, causal=True),
    cp_case("ring", 2, causal=True, heads_kv=1, sinks=True),
    cp_case("ring", 2, window=(3, 2), lq=32, lk=32),
    cp_case("ring", 2, softcap=2.0),
    cp_case("ring", 2, causal=True, lq=16, lk=24),
    cp_case("ring", 2, causal=True, lq=14, lk=14),  # odd shards: unbalanced but exact
    cp_case("ring", 2, causal=True, dtype=torch.bfloat16),
    cp_case("ring", 4, causal=True),
    cp_case("ring", 4, sinks=True, softcap=3.0),
    cp_case("ring", 4, causal=True, window=(5, -1), lq=32, lk=32),
    cp_case("ring", 4, window=(4, 4), lq=32, lk=32),
    cp_case("ulysses", 2, causal=True, sinks=True),
    cp_case("ulysses", 2, window=(3, 2), softcap=2.0),
    cp_case("ulysses", 4, causal=True, heads_q=8, heads_kv=4),
]


def slow_cases():
    modes = ((False, (-1, -1)), (True, (-1, -1)), (False, (5, 3)), (True, (6, -1)))
    grid = itertools.product(("ring", "ulysses"), (2, 4), modes, ((4, 4), (4, 2), (8, 4)), (0.0, 2.0),
                             (False, True))
    cases = []
    for method, ranks, (causal, window), (hq, hkv), cap, sinks in grid:
        if method == "ulysses" and hkv % ranks:
            continue
        cases.append(cp_case(method, ranks, causal=causal, window=window, heads_q=hq, heads_kv=hkv, softcap=cap,
                             sinks=sinks, lq=32, lk=32))
    return cases


@pytest.fixture(scope="module")
def pool():
    workers = Pool(4, subgroups=(2,))
    yield workers
    workers.close()


def _run(pool, cp, seed):
    inputs = draw(cp, seed)
    payload = (cp, {name: None if t is None else t.detach() for name, t in inputs.items()})
    results = raise_failures(pool.run(run_shard, payload))
    check(cp, inputs, assemble(results, cp.ranks))


@pytest.mark.parametrize("cp", CASES, ids=lambda c: c.id)
def test_equals_the_single_process_call(pool, cp):
    _run(pool, cp, seed=zlib.crc32(cp.id.encode()) % 10_000)


@pytest.mark.slow
@pytest.mark.parametrize("cp", slow_cases(), ids=lambda c: c.id)
def test_full_matrix(pool, cp):
    _run(pool, cp, seed=zlib.crc32(cp.id.encode()) % 10_000)


EXPECTED = {  # what every involved rank's error must name
    "shard_lengths_differ": "q: expected the same shape on every rank",
    "options_differ": "causal/window_size",
    "heads_not_divisible": "q: expected a head count divisible by the group size 2",
    "bad_window_on_one_rank": "window_size",
    "not_a_member": "group: expected a process group this process",
}


@pytest.mark.parametrize("kind", BAD_CALLS)
def test_bad_input_raises_on_every_rank_naming_the_argument(pool, kind):
    assert_refused(pool.run(bad_call, (2, kind)), kind, EXPECTED[kind])


def test_without_an_initialised_process_group_the_error_names_group():
    q = torch.randn(1, 8, 2, 8)
    with pytest.raises(RuntimeError, match="group: expected an initialised torch.distributed"):
        ring_flash_attn_func(q, q, q)


def test_the_pool_sends_back_collective_outputs_only_once_they_arrived(pool):
    # A worker's unwaited functional-collective output (Diffusers returns a context-parallel model's output
    # so) was pickled from its storage before the gather finished: now and then uninitialised memory.
    for rows in (1, 4096):
        for result in raise_failures(pool.run(gather_unwaited, rows)):
            gathered = result["gathered"][0]
            assert type(gathered) is torch.Tensor, type(gathered)
            expected = torch.arange(pool.size, dtype=torch.float32).repeat_interleave(rows)[:, None].expand(-1, 3)
            torch.testing.assert_close(gathered, expected, rtol=0, atol=0)
