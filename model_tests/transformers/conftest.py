"""Shared pieces of the transformers conformance suite: the same weights under eager and under an
mfa-hf implementation, padded inputs, and the check that our kernel really ran."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mfa_hf  # noqa: E402,F401  - registers "mps_flash" and "mfa"
from mfa_hf import trace  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

IMPLEMENTATIONS = ("mps_flash", "mfa")
# transformers' own eager-vs-sdpa tolerances (tests/test_modeling_common.py).
TOLERANCE = {torch.float32: dict(atol=1e-6, rtol=1e-4), torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
             torch.float16: dict(atol=5e-3, rtol=5e-3)}
BATCH, SEQ = 3, 10


def twin_models(family, implementation: str, dtype=torch.float32):
    """(eager reference, model under `implementation`) with identical weights and separate configs."""
    torch.manual_seed(0)
    # Built eager (not switched): up to 5.17 set_attn_implementation skipped submodels whose config class
    # equals the parent's (T5's stacks), so a switched reference could silently stay on sdpa.
    reference = family.model_cls._from_config(copy.deepcopy(family.config()), attn_implementation="eager").eval()
    model = family.model_cls(copy.deepcopy(family.config())).eval()
    model.load_state_dict(reference.state_dict())
    model.set_attn_implementation(implementation)
    return reference.to(dtype), model.to(dtype)


def padded_batch(side: str, vocab: int = 128, seq: int = SEQ):
    """input_ids (BATCH, seq) and a mask padding 2 and 4 tokens of rows 1 and 2 on `side`."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (BATCH, seq), generator=generator)
    mask = torch.ones_like(ids)
    for row, pad in ((1, 2), (2, 4)):
        if side == "left":
            mask[row, :pad] = 0
        else:
            mask[row, seq - pad:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def assert_close_where(actual, expected, mask, dtype=torch.float32, what="output"):
    """Compare only the positions where `mask` is 1 (padded positions are ignored, as upstream)."""
    keep = mask.bool()
    torch.testing.assert_close(actual[keep].float(), expected[keep].float(), **TOLERANCE[dtype], msg=lambda m: f"{what}: {m}")


def kernel_calls(calls) -> int:
    return sum(trace.served_by(calls).values())


def assert_logits_like_eager(reference, model, ids, mask, what: str) -> None:
    """A causal LM's logits under our implementation (`model`) close to eager's (`reference`) on the valid
    positions, with our kernel having served at least two calls."""
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        with trace.capture() as calls:
            actual = model(ids, attention_mask=mask).logits
    assert kernel_calls(calls) >= 2, f"{what}: mfa-hf kernel did not run ({dict(trace.served_by(calls))})"
    assert_close_where(actual, expected, mask, what=f"{what} logits")


@pytest.fixture
def capture():
    with trace.capture() as calls:
        yield calls
