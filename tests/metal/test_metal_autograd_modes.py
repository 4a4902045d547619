"""tests/test_autograd_modes.py on the metal backend: forward mode and a gradient of a gradient refused by name (a
kernel's output carried no tangent: a silent zero), the new tokens of an append refusing a backward."""

import pytest

from mfa_hf.testing_autograd_modes import (
    CASES,
    check_append_refuses_backward,
    check_double_backward_refused,
    check_tangent_refused,
)


@pytest.mark.parametrize(("entry", "name"), CASES)
def test_a_tangent_is_refused_by_name(entry, name, metal_backend):
    check_tangent_refused(entry, name, metal_backend.device)


@pytest.mark.parametrize("entry", ["flash_attn_func", "flash_attention", "flash_attn_varlen_func"])
def test_a_gradient_of_a_gradient_is_refused_by_name(entry, metal_backend):
    check_double_backward_refused(entry, metal_backend.device)


@pytest.mark.parametrize("cache", ["plain", "int8"])
def test_appended_tokens_refuse_a_backward_by_name(cache, metal_backend):
    check_append_refuses_backward("k and v", cache, False, metal_backend.device)
