"""Bad input gets a clear error naming the argument, what was expected and what came."""

import math

import pytest
import torch

import mfa_hf


def qkv(b=2, lq=5, lk=6, hq=4, hkv=2, d=8, dv=None, dtype=torch.float32):
    return (torch.randn(b, lq, hq, d, dtype=dtype), torch.randn(b, lk, hkv, d, dtype=dtype),
            torch.randn(b, lk, hkv, dv or d, dtype=dtype))


def packed(lens=(3, 4)):
    total = sum(lens)
    cu = torch.tensor([0, lens[0], total], dtype=torch.int32)
    return torch.randn(total, 4, 8), torch.randn(total, 2, 8), torch.randn(total, 2, 8), cu


@pytest.mark.parametrize("change, error, match", [
    (lambda q, k, v: (q[0], k, v), ValueError, r"q: expected a 4-D tensor .*got shape \(5, 4, 8\)"),
    (lambda q, k, v: (q, k[:1], v), ValueError, r"k, v: expected batch 2 like q, got 1 and 2"),
    (lambda q, k, v: (q, k, v[..., :1, :]), ValueError, r"v: expected 2 heads like k, got 1"),
    (lambda q, k, v: (q, k[..., :4], v), ValueError, r"k: expected head dim 8 like q, got 4"),
    (lambda q, k, v: (q, k[:, :, :1].expand(2, 6, 3, 8), v[:, :, :1].expand(2, 6, 3, 8)), ValueError,
     r"k: expected a number of KV heads dividing 4 query heads, got 3"),
    (lambda q, k, v: (q, k.half(), v), TypeError, r"k: expected dtype torch.float32 like q, got torch.float16"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, r"q: expected float16, bfloat16, float32 or float64, got torch.int32"),
    (lambda q, k, v: (torch.randn(2, 5, 4, 300), torch.randn(2, 6, 2, 300), v), ValueError,
     r"q: expected a head dim in 1..256, got 300"),
    (lambda q, k, v: (torch.randn(2, 5, 4, 0), torch.randn(2, 6, 2, 0), v), ValueError,
     r"q: expected a head dim in 1..256, got 0"),
    (lambda q, k, v: (q, k, v[:, :3]), ValueError, r"v: expected 6 keys like k, got 3"),
    (lambda q, k, v: (q, k, [1, 2]), TypeError, r"v: expected a torch.Tensor, got list"),
], ids=["rank", "batch", "heads_v", "head_dim_k", "gqa_ratio", "mixed_dtype", "int_dtype", "dim_300",
        "dim_0", "v_len", "not_tensor"])
def test_shape_and_dtype_errors(change, error, match):
    with pytest.raises(error, match=match):
        mfa_hf.flash_attn_func(*change(*qkv()))


def test_mixed_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k: expected device cpu like q, got meta"):
        mfa_hf.flash_attn_func(q, k.to("meta"), v)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(window_size=(-2, 0)), ValueError, r"window_size: expected left >= -1 .*got -2"),
    (dict(window_size=(3,)), ValueError, r"window_size: expected a pair \(left, right\), got \(3,\)"),
    (dict(window_size=(1, 2.5)), ValueError, r"window_size: expected right >= -1 .*got 2.5"),
    (dict(softcap=-1.0), ValueError, r"softcap: expected a finite number >= 0 .*got -1.0"),
    (dict(softmax_scale=math.inf), ValueError, r"softmax_scale: expected a finite number, got inf"),
    (dict(softmax_scale=math.nan), ValueError, r"softmax_scale: expected a finite number, got nan"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p: expected a probability in \[0, 1\), got 1.0"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p: expected a probability in \[0, 1\), got -0.1"),
    (dict(attn_mask=torch.ones(2, 3, 5, 6, dtype=torch.bool)), ValueError,
     r"attn_mask: expected a shape broadcastable to \(B, Hq, Lq, Lk\) = \(2, 4, 5, 6\), got \(2, 3, 5, 6\)"),
    (dict(attn_mask=torch.ones(1, 2, 4, 5, 6, dtype=torch.bool)), ValueError, r"attn_mask: expected a shape broadcastable"),
    (dict(attn_mask=torch.ones(5, 6, dtype=torch.uint8)), TypeError,
     r"attn_mask: expected dtype bool \(True = attend\) or a float dtype, got torch.uint8"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes: expected shape \(4,\) or \(2, 4\), got \(3,\)"),
    (dict(sinks=torch.ones(2, 4)), ValueError, r"sinks: expected one logit per query head, shape \(4,\), got \(2, 4\)"),
    (dict(sinks=torch.ones(4, dtype=torch.int64)), TypeError, r"sinks: expected a float dtype, got torch.int64"),
], ids=lambda x: str(x)[:40])
def test_option_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        mfa_hf.flash_attn_func(*qkv(), **kwargs)


@pytest.mark.parametrize("cu_q, cu_k, error, match", [
    (torch.tensor([0, 3, 7], dtype=torch.float32), None, TypeError, r"cu_seqlens_q: expected dtype int32 or int64, got torch.float32"),
    (torch.tensor([1, 3, 7], dtype=torch.int32), None, ValueError, r"cu_seqlens_q: expected to start at 0, got 1"),
    (torch.tensor([0, 5, 4, 7], dtype=torch.int32), torch.tensor([0, 3, 5, 7], dtype=torch.int32), ValueError,
     r"cu_seqlens_q: expected non-decreasing offsets, got \[0, 5, 4, 7\]"),
    (torch.tensor([0, 3, 6], dtype=torch.int64), None, ValueError, r"cu_seqlens_q: expected to end at the total length 7, got 6"),
    (None, torch.tensor([0, 7], dtype=torch.int32), ValueError, r"cu_seqlens_k: expected 3 offsets like cu_seqlens_q, got 2"),
    (torch.tensor([[0, 3, 7]], dtype=torch.int32), None, ValueError, r"cu_seqlens_q: expected a 1-D tensor of B \+ 1 offsets"),
])
def test_cu_seqlens_errors(cu_q, cu_k, error, match):
    q, k, v, cu = packed()
    with pytest.raises(error, match=match):
        mfa_hf.flash_attn_varlen_func(q, k, v, cu if cu_q is None else cu_q, cu if cu_k is None else cu_k, 4, 4)


def test_max_seqlen_too_small():
    q, k, v, cu = packed()
    with pytest.raises(ValueError, match=r"max_seqlen_q: expected at least the longest sequence \(4\), got 3"):
        mfa_hf.flash_attn_varlen_func(q, k, v, cu, cu, 3, 4)


def test_bhsd_window_errors():
    q, k, v = (t.transpose(1, 2) for t in qkv(hkv=4))
    with pytest.raises(ValueError, match=r"window_size: expected an int >= 1 \(keys visible\), got 0"):
        mfa_hf.flash_attention(q, k, v, is_causal=True, window_size=0)
    with pytest.raises(ValueError, match=r"chunk_size: expected an int >= 1, got 0"):
        mfa_hf.flash_attention_chunked(q, k, v, chunk_size=0)
