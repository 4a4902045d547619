"""Shared checks of what each autograd mode gets (tests/test_autograd_modes.py, and its metal twin): forward mode and a
gradient of a gradient refused by name on every entry point, and the new tokens of an append refusing a backward."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwad

import mfa_hf
from mfa_hf.ops import APPEND_HAS_NO_BACKWARD, DECODE_HAS_NO_BACKWARD

FORWARD_MODE = "no forward-mode AD"


def tensors(seed: int = 0, device="cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    found = dict(q=torch.randn(2, 5, 4, 8, generator=g), k=torch.randn(2, 7, 2, 8, generator=g),
                 v=torch.randn(2, 7, 2, 8, generator=g), mask=torch.randn(2, 1, 5, 7, generator=g),
                 sinks=torch.randn(4, generator=g))
    return {name: t.to(device) for name, t in found.items()}


def _varlen(q, k, v, mask, sinks):
    cu = torch.tensor([0, 5, 10], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0, 7, 14], dtype=torch.int32, device=q.device)
    return mfa_hf.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu_k, 5, 7,
                                         causal=True, sinks=sinks)


ENTRY_POINTS = {  # name -> call over the tensors of tensors(); each reads q, k, v and the named extras
    "flash_attn_func": lambda q, k, v, mask, sinks: mfa_hf.flash_attn_func(q, k, v, causal=True, sinks=sinks),
    "flash_attention": lambda q, k, v, mask, sinks: mfa_hf.flash_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask),
    "flash_attention_chunked": lambda q, k, v, mask, sinks: mfa_hf.flash_attention_chunked(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True),
    "flash_attn_varlen_func": _varlen,
    "flash_attn_with_kvcache": lambda q, k, v, mask, sinks: mfa_hf.flash_attn_with_kvcache(
        q[:, :1], k, v, cache_seqlens=6),
    "quantized k/v": lambda q, k, v, mask, sinks: mfa_hf.flash_attn_func(
        q, mfa_hf.quantize_kv(k, "int8"), mfa_hf.quantize_kv(v, "int8"), causal=True),
}
TANGENT_ON = {"flash_attn_func": ("q", "k", "v", "sinks"), "flash_attention": ("q", "k", "v", "mask"),
              "flash_attention_chunked": ("q", "k", "v"), "flash_attn_varlen_func": ("q", "k", "v", "sinks"),
              "flash_attn_with_kvcache": ("q",), "quantized k/v": ("q",)}
CASES = [(entry, name) for entry, names in TANGENT_ON.items() for name in names]


def check_tangent_refused(entry: str, name: str, device="cpu") -> None:
    """A tangent on input `name` of `entry` is refused by name, also once the call's kind was seen (its replay)."""
    inputs = tensors(0, device)
    call = ENTRY_POINTS[entry]
    for _ in range(2):
        call(**inputs)
    with fwad.dual_level():
        dual = dict(inputs, **{name: fwad.make_dual(inputs[name], torch.ones_like(inputs[name]))})
        with pytest.raises(NotImplementedError, match=FORWARD_MODE):
            call(**dual)


def check_double_backward_refused(entry: str, device="cpu") -> None:
    """create_graph=True: first-order gradients equal a plain backward's; a backward through them is refused."""
    inputs = tensors(2, device)
    q = inputs["q"].requires_grad_()
    out = ENTRY_POINTS[entry](**inputs)
    (plain,) = torch.autograd.grad(out.square().sum(), q, retain_graph=True)
    (recorded,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="no double backward"):
        recorded.sum().backward()


def check_append_refuses_backward(needs: str, cache: str, return_lse: bool, device="cpu") -> None:
    """New k/v requiring grad (`needs` names them, and maybe q) are appended and attended as without grad; a
    backward that would need their gradients is refused, naming them."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 4, 8, generator=g).to(device).requires_grad_("q" in needs)
    k_new, v_new = (torch.randn(2, 1, 2, 8, generator=g).to(device).requires_grad_(name in needs) for name in "kv")
    stored = torch.randn(2, 3, 2, 8, generator=g).to(device), torch.randn(2, 3, 2, 8, generator=g).to(device)

    def caches():
        k_cache, v_cache = torch.zeros(2, 6, 2, 8, device=device), torch.zeros(2, 6, 2, 8, device=device)
        k_cache[:, :3], v_cache[:, :3] = stored
        if cache == "plain":
            return k_cache, v_cache
        return tuple(mfa_hf.quantize_kv(c, cache, granularity="token") for c in (k_cache, v_cache))

    found = mfa_hf.flash_attn_with_kvcache(q, *caches(), k_new, v_new, cache_seqlens=3, return_lse=return_lse)
    with torch.no_grad():
        expected = mfa_hf.flash_attn_with_kvcache(q, *caches(), k_new, v_new, cache_seqlens=3, return_lse=return_lse)
    for have, want in zip(*(x if return_lse else (x,) for x in (found, expected))):
        torch.testing.assert_close(have, want, rtol=0, atol=0)
    out = found[0] if return_lse else found
    with pytest.raises(RuntimeError) as raised:
        out.sum().backward()
    assert str(raised.value) in (APPEND_HAS_NO_BACKWARD, DECODE_HAS_NO_BACKWARD)
