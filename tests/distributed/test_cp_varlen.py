"""ring_flash_attn_varlen_func and ulysses_flash_attn_varlen_func on CPU/gloo, 2 and 4 ranks: every rank
its contiguous shard of the packed stream with the global cu_seqlens; the assembled output, LSE and
gradients against the float64 varlen reference of the whole stream (DESIGN.md's rule, as the
single-process flash_attn_varlen_func is held). One pool of 4 ranks per module; the matrix is slow.
"""

import itertools
import zlib

import pytest
import torch

from mfa_hf.distributed import ring_flash_attn_varlen_func
from mfa_hf.distributed.ring_plan import RingPlan
from mfa_hf.distributed.testing import Pool, assert_refused, raise_failures
from mfa_hf.distributed.testing_attention import assemble
from mfa_hf.distributed.testing_varlen import check_varlen, draw_varlen, run_varlen_shard, varlen_case
from mfa_hf.distributed.testing_varlen_bad import BAD_VARLEN_CALLS, EXPECTED, bad_varlen_call

MIXED = (5, 0, 17, 10)  # 32 tokens: an empty sequence, and sequences straddling the rank boundaries
CASES = [
    varlen_case("ring", 2, MIXED),
    varlen_case("ring", 2, MIXED, causal=True, sinks=True),
    varlen_case("ring", 2, (7, 9, 16), (12, 4, 16), causal=True),  # per-sequence Lq != Lk, bottom-right
    varlen_case("ring", 2, (10, 6), (4, 12), causal=True, heads_kv=1),  # rows that see no key
    varlen_case("ring", 2, MIXED, window=(3, 2), softcap=2.0),
    varlen_case("ring", 2, (9, 21), causal=True),  # odd shards: natural order, exact
    varlen_case("ring", 2, MIXED, causal=True, dtype=torch.bfloat16),
    varlen_case("ring", 4, (13, 3, 20, 12), causal=True),
    varlen_case("ring", 4, (100, 28), causal=True, heads_kv=1),  # a long sequence: zig-zag over the stream
    varlen_case("ring", 4, (4, 8, 4), (10, 12, 10), causal=True, window=(5, -1), sinks=True),
    varlen_case("ring", 4, (2, 3, 3, 1, 7, 8), window=(2, 2)),  # short sequences: the ring stops early
    varlen_case("ulysses", 2, MIXED, causal=True, sinks=True),
    varlen_case("ulysses", 4, (13, 3, 20, 12), (10, 10, 20, 8), heads_q=8, heads_kv=4, window=(4, 1)),
]


def slow_cases():
    packings = ((MIXED, MIXED), ((1, 15, 8, 8), (8, 8, 8, 8)), ((32,), (32,)))
    modes = ((False, (-1, -1)), (True, (-1, -1)), (False, (5, 3)), (True, (6, -1)))
    grid = itertools.product(("ring", "ulysses"), (2, 4), packings, modes, ((4, 4), (4, 2)), (False, True))
    return [varlen_case(method, ranks, lq, lk, causal=causal, window=window, heads_q=hq, heads_kv=hkv, sinks=sinks)
            for method, ranks, (lq, lk), (causal, window), (hq, hkv), sinks in grid
            if not (method == "ulysses" and hkv % ranks)]


@pytest.fixture(scope="module")
def pool():
    workers = Pool(4, subgroups=(2,))
    yield workers
    workers.close()


def _run(pool, case):
    inputs = draw_varlen(case, seed=zlib.crc32(case.id.encode()) % 10_000)
    results = raise_failures(pool.run(run_varlen_shard, (case, inputs)))
    check_varlen(case, inputs, assemble(results, case.ranks, seq_dim=0))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_varlen_equals_the_single_process_call(pool, case):
    _run(pool, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", slow_cases(), ids=lambda c: c.id)
def test_varlen_full_matrix(pool, case):
    _run(pool, case)


@pytest.mark.parametrize("kind", BAD_VARLEN_CALLS)
def test_bad_packing_raises_on_every_rank_naming_the_argument(pool, kind):
    assert_refused(pool.run(bad_varlen_call, (2, kind)), kind, EXPECTED[kind], ("ValueError", "TypeError"))


def test_short_sequences_stop_the_ring_and_one_sequence_balances_like_the_dense_plan():
    offsets = (0, 2, 5, 10, 11, 18, 26, 32)  # 8 tokens a rank; no sequence spans more than two ranks
    assert RingPlan.build(4, 8, 8, (-1, 0), offsets, offsets).last_step == 1  # causal: one hop back
    assert RingPlan.build(4, 8, 8, (-1, -1), offsets, offsets).last_step == 3  # the next rank's keys come last
    assert RingPlan.build(4, 8, 8, (-1, -1), (0, 8, 16, 24, 32), (0, 8, 16, 24, 32)).last_step == 0
    assert RingPlan.build(4, 32, 32, (-1, 0), (0, 100, 128), (0, 100, 128)).balanced  # a long one: zig-zag
    dense, packed = RingPlan.build(4, 8, 8, (-1, 0)), RingPlan.build(4, 8, 8, (-1, 0), (0, 32), (0, 32))
    assert packed == dense and packed.balanced


def test_without_an_initialised_process_group_the_error_names_group():
    q, cu = torch.randn(8, 2, 8), torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="group: expected an initialised torch.distributed"):
        ring_flash_attn_varlen_func(q, q, q, cu, cu, 8, 8)
