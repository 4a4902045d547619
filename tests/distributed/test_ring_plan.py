"""The ring's plan without processes: blocks are exact, zig-zag balances causal work, windows stop the ring."""

import itertools

import pytest
import torch

from mfa_hf.distributed.blocks import plan_block
from mfa_hf.distributed.ring_plan import RingPlan
from mfa_hf.kernels.reference import visible_keys


def visible(q_start, q_len, k_start, k_len, window):
    """The global visibility of the block by the rule of record (query positions already shifted)."""
    i = torch.arange(q_start, q_start + q_len)[:, None]
    j = torch.arange(k_start, k_start + k_len)[None, :]
    left, right = window
    ok = torch.ones(q_len, k_len, dtype=torch.bool)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (3, 0), (2, 5), (0, 0), (-1, 2), (4, -1)])
def test_a_trimmed_block_with_its_window_sees_exactly_the_global_visibility(window):
    for q_start, k_start in itertools.product(range(0, 24, 3), range(0, 24, 5)):
        want = visible(q_start, 6, k_start, 7, window)
        block = plan_block(q_start, 6, k_start, 7, window)
        got = torch.zeros(6, 7, dtype=torch.bool)
        if block is not None:
            lq, lk = block.q1 - block.q0, block.k1 - block.k0
            assert min(block.window) >= -1
            got[block.q0:block.q1, block.k0:block.k1] = visible_keys(lq, lk, False, block.window)
        assert torch.equal(got, want), (q_start, k_start, window, block)


def _work(plan, rank):
    return sum((p.rows.stop - p.rows.start) * (p.keys.stop - p.keys.start)
               for s in range(plan.last_step + 1) for p in plan.pieces(rank, s))


def test_zigzag_gives_every_rank_the_same_causal_work():
    plan = RingPlan.build(4, 16, 16, (-1, 0))
    assert plan.balanced
    assert len({_work(plan, r) for r in range(4)}) == 1
    unbalanced = RingPlan.build(4, 15, 15, (-1, 0))  # odd shards cannot split in two
    assert not unbalanced.balanced
    assert len({_work(unbalanced, r) for r in range(4)}) == 4


def test_a_window_stops_the_ring_once_no_rank_has_keys_left_to_see():
    assert RingPlan.build(8, 16, 16, (-1, -1)).last_step == 7
    assert RingPlan.build(8, 16, 16, (16, 0)).last_step == 1
    assert RingPlan.build(8, 16, 16, (3, 0)).last_step == 1
    assert RingPlan.build(8, 16, 16, (0, 0)).last_step == 0
