"""The torch backend against the float64 reference over the feature matrix, forward and gradients."""

import pytest
import torch

import mfa_hf
from mfa_hf.kernels.reference import attention_reference
from mfa_hf.testing import (
    Case,
    check_against_reference,
    core_cases,
    full_cases,
    run_public_api,
)


def check_case(case: Case, seed: int = 0, gradients: bool = True):
    check_against_reference(case, run_public_api, backend="torch", seed=seed, gradients=gradients)


@pytest.mark.parametrize("case", core_cases(), ids=lambda c: c.id)
def test_matches_reference_across_tiles(case, small_tiles):
    check_case(case)


@pytest.mark.parametrize("case", core_cases()[::9], ids=lambda c: c.id)
def test_matches_reference_default_tiles(case):
    check_case(case, seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("case", full_cases(), ids=lambda c: c.id)
def test_full_matrix(case, small_tiles):
    check_case(case, seed=7)


@pytest.mark.parametrize("dim", [1, 3, 128, 256])
def test_head_dims_to_256(dim, small_tiles):
    check_case(Case(dtype=torch.bfloat16, lq=19, lk=21, dim=dim, dim_v=dim, causal=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_matches_reference_with_same_seed(dtype, small_tiles):
    case = Case(dtype=dtype, lq=30, lk=41, causal=True, sinks=True, dropout_p=0.3)
    check_against_reference(case, backend="torch", dropout_seed=torch.tensor(1234))


def test_dropout_drops_the_requested_fraction():
    q = torch.zeros(1, 64, 2, 8)  # uniform attention: output = mean of kept v rows, scaled
    v = torch.ones(1, 512, 2, 8)
    out = mfa_hf.flash_attn_func(q, torch.zeros(1, 512, 2, 8), v, dropout_p=0.25, dropout_seed=5)
    kept = (out[..., 0] * (1 - 0.25)).mean().item()
    assert abs(kept - 0.75) < 0.01
    again = mfa_hf.flash_attn_func(q, torch.zeros(1, 512, 2, 8), v, dropout_p=0.25, dropout_seed=5)
    assert torch.equal(out, again)
    other = mfa_hf.flash_attn_func(q, torch.zeros(1, 512, 2, 8), v, dropout_p=0.25, dropout_seed=6)
    assert not torch.equal(out, other)


def test_windows_beyond_2_pow_24_keys(monkeypatch):
    """Positions past 2**24 are not exact in float32: the band must be computed in integers."""
    monkeypatch.setenv("MFA_BACKEND", "torch")
    lk = 2**24 + 7
    k = torch.randn(1, lk, 1, 1)
    v = (torch.arange(lk, dtype=torch.float64) - (lk - 10)).float().reshape(1, lk, 1, 1)  # exact near the end
    q = torch.randn(1, 2, 1, 1)
    out = mfa_hf.flash_attn_func(q, k, v, causal=True, window_size=(3, 0), alibi_slopes=torch.tensor([0.25]))
    tail = slice(lk - 5, lk)
    want, _ = attention_reference(q.double(), k[:, tail].double(), v[:, tail].double(), causal=True,
                                  window_size=(3, 0), alibi_slopes=torch.tensor([0.25], dtype=torch.float64))
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
