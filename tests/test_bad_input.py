"""Bad input gets a clear error naming the argument, what was expected and what came."""

import math

import numpy
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
    (lambda q, k, v: (torch.randn(2, 5, 4, 0), torch.randn(2, 6, 2, 0), v), ValueError,
     r"q: expected a head dim >= 1, got 0"),
    (lambda q, k, v: (q, k, torch.randn(2, 6, 2, 0)), ValueError, r"v: expected a head dim >= 1, got 0"),
    (lambda q, k, v: (q, k, v[:, :3]), ValueError, r"v: expected 6 keys like k, got 3"),
    (lambda q, k, v: (q, k, [1, 2]), TypeError, r"v: expected a torch.Tensor, got list"),
], ids=["rank", "batch", "heads_v", "head_dim_k", "gqa_ratio", "mixed_dtype", "int_dtype", "dim_0",
        "dim_v_0", "v_len", "not_tensor"])
def test_shape_and_dtype_errors(change, error, match):
    with pytest.raises(error, match=match):
        mfa_hf.flash_attn_func(*change(*qkv()))


def _non_dense(t: torch.Tensor, kind: str) -> torch.Tensor:
    import warnings

    if kind == "sparse":
        return t.to_sparse()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # strided nested tensors warn that their API is a prototype
        parts = [t[0], t[0]] if t.dim() > 1 else [t, t]
        return torch.nested.nested_tensor(parts, layout=torch.jagged if kind == "jagged" else torch.strided)


def _entry_points():
    """(entry point, call taking one replaced tensor argument) for every tensor argument of each entry point."""
    q, k, v = qkv()
    lengths = torch.tensor([3, 4], dtype=torch.int32)
    kc, vc = torch.randn(2, 16, 2, 8), torch.randn(2, 16, 2, 8)
    new_k, new_v = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    tq, tk, tv, cu = packed()
    x = torch.randn(1, 4, 2, 64)
    fa = dict(q=q, k=k, v=v, attn_mask=torch.ones(2, 4, 5, 6, dtype=torch.bool), alibi_slopes=torch.rand(4),
              sinks=torch.zeros(4))
    kv = dict(q=torch.randn(2, 1, 4, 8), k_cache=kc, v_cache=vc, k=new_k, v=new_v, cache_seqlens=lengths,
              sinks=torch.zeros(4), alibi_slopes=torch.rand(4))
    vl = dict(q=tq, k=tk, v=tv, cu_seqlens_q=cu, cu_seqlens_k=cu)
    calls = []
    for name in fa:
        calls.append(("flash_attn_func", name, lambda a, name=name: mfa_hf.flash_attn_func(**{**fa, name: a})))
    for name in kv:
        calls.append(("flash_attn_with_kvcache", name, lambda a, name=name: mfa_hf.flash_attn_with_kvcache(
            **{**kv, "k_cache": kv["k_cache"].clone(), "v_cache": kv["v_cache"].clone(), name: a})))
    for name in vl:
        calls.append(("flash_attn_varlen_func", name, lambda a, name=name: mfa_hf.flash_attn_varlen_func(
            **{**vl, name: a}, max_seqlen_q=4, max_seqlen_k=4)))
    calls.append(("quantize_kv", "x", lambda a: mfa_hf.quantize_kv(a, "int8")))
    calls.append(("quantize_kv", "scales", lambda a: mfa_hf.quantize_kv(x, "int8", granularity="head", scales=a)))
    tensors = {**{("flash_attn_func", n): t for n, t in fa.items()},
               **{("flash_attn_with_kvcache", n): t for n, t in kv.items()},
               **{("flash_attn_varlen_func", n): t for n, t in vl.items()},
               ("quantize_kv", "x"): x, ("quantize_kv", "scales"): torch.ones(1, 1, 2, 1)}
    return [(entry, name, call, tensors[(entry, name)]) for entry, name, call in calls]


@pytest.mark.parametrize("kind", ["nested", "jagged", "sparse"])
def test_non_dense_tensors_are_refused_by_name(kind):
    """Every tensor argument of every entry point, nested (strided or jagged) or sparse: a TypeError naming
    that argument (they used to reach internal 'doesn't support sizes' / sparse backend errors)."""
    for entry, name, call, tensor in _entry_points():
        odd = _non_dense(tensor, kind)
        with pytest.raises(TypeError, match=rf"{name}: expected a dense \(strided\) tensor, got a "):
            call(odd)
        call(tensor)  # the same call with the dense argument is fine: the refusal is about the layout


def test_mixed_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k: expected device cpu like q, got meta"):
        mfa_hf.flash_attn_func(q, k.to("meta"), v)


def _cache_call(q, k, v, move):
    k_cache, v_cache = (torch.zeros(2, 16, 2, 8) for _ in range(2))
    if move == "cache":
        k_cache, v_cache = (t.to("meta", torch.float16) for t in (k_cache, v_cache))
        return mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=4)
    return mfa_hf.flash_attn_with_kvcache(q, k_cache, v_cache, k[:, :1].to("meta", torch.float16),
                                          v[:, :1].to("meta", torch.float16), cache_seqlens=4)


@pytest.mark.parametrize("call, name", [
    (lambda q, k, v: mfa_hf.flash_attn_func(q, k.to("meta", torch.float16), v.to("meta", torch.float16)), "k"),
    (lambda q, k, v: mfa_hf.flash_attention(q.transpose(1, 2), k.transpose(1, 2).to("meta", torch.float16),
                                            v.transpose(1, 2).to("meta", torch.float16)), "k"),
    (lambda q, k, v: __import__("mfa_hf.mps_flash_attn").mps_flash_attn.flash_attention(
        q.transpose(1, 2), k.transpose(1, 2).to("meta", torch.float16), v.transpose(1, 2).to("meta", torch.float16)),
     "k"),
    (lambda q, k, v: _cache_call(q, k, v, "cache"), "k_cache"),
    (lambda q, k, v: _cache_call(q, k, v, "new"), "k"),
], ids=["flash_attn_func", "flash_attention", "mps_flash_attn", "kvcache_cache", "kvcache_new"])
def test_another_device_is_named_before_another_dtype(call, name):
    # FlashAttention and mps-flash-attn check devices first, and their tests expect ValueError/RuntimeError for
    # tensors on two devices whatever their dtypes (ours said TypeError for the dtype).
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"{name}: expected device cpu like q, got meta"):
        call(q, k, v)


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


# ------------------------------------------------------------------------------------------------
# Every public entry point, each class of bad value: one row per case (the call, the exception type,
# a regex that names the argument, what was expected and what came). Built lazily: a row's tensors
# are made when it runs.

def cache(b=2, s=16, h=2, d=8):
    """q (B, 1, 4, D) and a plain (B, S, H, D) cache."""
    return torch.randn(b, 1, 4, d), torch.zeros(b, s, h, d), torch.zeros(b, s, h, d)


def bhsd():
    return tuple(t.transpose(1, 2) for t in qkv(hkv=4))


def meta(t):
    return t.to("meta")


def _quantized_layer(**kwargs):
    from mfa_hf.integrations.transformers.quantized_cache import MFAQuantizedLayer

    return MFAQuantizedLayer(**kwargs)


def _int8_codes():
    return mfa_hf.quantize_kv_int8(torch.randn(1, 2, 8, 64))


def _varlen(**changes):
    q, k, v, cu = packed()
    args = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4, max_seqlen_k=4)
    args.update(changes)
    if args.pop("all_meta", False):
        q, k, v = meta(q), meta(k), meta(v)
        args["cu_seqlens_q"], args["cu_seqlens_k"] = meta(cu), meta(cu)
    return mfa_hf.flash_attn_varlen_func(q, k, v, **args)


BAD = {
    # -- a number expected: strings, None, lists, bools, complex, tensors of several values, meta --------
    "softcap str": (lambda: mfa_hf.flash_attn_func(*qkv(), softcap="big"), TypeError,
                    r"softcap: expected a finite number >= 0 \(0 = off\), got 'big'"),
    "softcap None": (lambda: mfa_hf.flash_attn_func(*qkv(), softcap=None), TypeError, r"softcap: expected .*got None"),
    "softcap bool": (lambda: mfa_hf.flash_attn_func(*qkv(), softcap=True), TypeError, r"softcap: expected .*got True"),
    "softcap 1-D tensor": (lambda: mfa_hf.flash_attn_func(*qkv(), softcap=torch.ones(2)), TypeError,
                           r"softcap: expected .*got a 1-D torch.float32 tensor"),
    "softcap nan": (lambda: mfa_hf.flash_attn_func(*qkv(), softcap=math.nan), ValueError,
                    r"softcap: expected a finite number >= 0 .*got nan"),
    "softmax_scale list": (lambda: mfa_hf.flash_attn_func(*qkv(), softmax_scale=[0.1]), TypeError,
                           r"softmax_scale: expected a finite number or None .*got \[0.1\]"),
    "softmax_scale complex": (lambda: mfa_hf.flash_attn_func(*qkv(), softmax_scale=1j), TypeError,
                              r"softmax_scale: expected .*got 1j"),
    "softmax_scale meta": (lambda: mfa_hf.flash_attn_func(*qkv(), softmax_scale=meta(torch.tensor(0.1))), TypeError,
                           r"softmax_scale: expected .*got a 0-D torch.float32 tensor on meta"),
    "dropout_p None": (lambda: mfa_hf.flash_attn_func(*qkv(), dropout_p=None), TypeError,
                       r"dropout_p: expected a probability in \[0, 1\), got None"),
    "dropout_p nan": (lambda: mfa_hf.flash_attn_func(*qkv(), dropout_p=math.nan), ValueError,
                      r"dropout_p: expected a probability in \[0, 1\), got nan"),
    "bhsd scale str": (lambda: mfa_hf.flash_attention(*bhsd(), scale="x"), TypeError,
                       r"^scale: expected a finite number or None .*got 'x'"),
    "chunked scale inf": (lambda: mfa_hf.flash_attention_chunked(*bhsd(), scale=math.inf, chunk_size=2), ValueError,
                          r"^scale: expected a finite number, got inf"),
    "chunked softcap str": (lambda: mfa_hf.flash_attention_chunked(*bhsd(), softcap="30", chunk_size=2), TypeError,
                            r"softcap: expected .*got '30'"),
    "kvcache softcap str": (lambda: mfa_hf.flash_attn_with_kvcache(*cache(), softcap="big"), TypeError,
                            r"softcap: expected .*got 'big'"),
    "kvcache softmax_scale None is the default": (lambda: mfa_hf.flash_attn_with_kvcache(*cache(), softmax_scale="x"),
                                                  TypeError, r"softmax_scale: expected .*got 'x'"),
    "quantized dropout_p str": (lambda: mfa_hf.flash_attn_func(
        qkv()[0], *(mfa_hf.quantize_kv(t, "int8") for t in qkv()[1:]), dropout_p="x"), TypeError,
        r"dropout_p: expected a probability .*got 'x'"),
    "dropout_seed str": (lambda: mfa_hf.flash_attn_func(*qkv(), dropout_p=0.1, dropout_seed="x"), TypeError,
                         r"dropout_seed: expected an int.*got 'x'"),
    "dropout_seed float": (lambda: mfa_hf.flash_attn_func(*qkv(), dropout_p=0.1, dropout_seed=1.5), TypeError,
                           r"dropout_seed: expected an int.*got 1.5"),
    "dropout_seed 2 values": (lambda: mfa_hf.flash_attn_func(*qkv(), dropout_p=0.1, dropout_seed=torch.tensor([1, 2])),
                              TypeError, r"dropout_seed: expected an int or a 1-element integer tensor.*shape \(2,\)"),
    # -- a bool expected ----------------------------------------------------------------------------------
    "causal str": (lambda: mfa_hf.flash_attn_func(*qkv(), causal="no"), TypeError, r"causal: expected a bool, got 'no'"),
    "is_causal str": (lambda: mfa_hf.flash_attention(*bhsd(), is_causal="yes"), TypeError,
                      r"is_causal: expected a bool, got 'yes'"),
    "kvcache causal tensor": (lambda: mfa_hf.flash_attn_with_kvcache(*cache(), causal=torch.tensor([True, False])),
                              TypeError, r"causal: expected a bool, got a 1-D torch.bool tensor"),
    # -- an int expected: floats are refused, not truncated; negative sizes ---------------------------------
    "max_seqlen float": (lambda: _varlen(max_seqlen_q=4.5), TypeError,
                         r"max_seqlen_q: expected an int >= 0 .*got 4.5"),
    "max_seqlen str": (lambda: _varlen(max_seqlen_k="big"), TypeError, r"max_seqlen_k: expected an int .*got 'big'"),
    "max_seqlen inf": (lambda: _varlen(max_seqlen_q=math.inf), TypeError, r"max_seqlen_q: expected an int .*got inf"),
    "max_seqlen negative": (lambda: _varlen(max_seqlen_q=-1), ValueError, r"max_seqlen_q: expected an int >= 0 .*got -1"),
    "window float": (lambda: mfa_hf.flash_attn_func(*qkv(), window_size=(4.0, 0)), ValueError,
                     r"window_size: expected left >= -1 \(an int, -1 = unbounded\), got 4.0"),
    "window bool": (lambda: mfa_hf.flash_attn_func(*qkv(), window_size=(True, 0)), ValueError,
                    r"window_size: expected left >= -1 .*got True"),
    "bhsd window float": (lambda: mfa_hf.flash_attention(*bhsd(), window_size=2.0), ValueError,
                          r"window_size: expected None, an int >= 1 \(keys visible\) or a pair, got 2.0"),
    "kvcache window str": (lambda: mfa_hf.flash_attn_with_kvcache(*cache(), window_size="ab"), ValueError,
                           r"window_size: expected a pair \(left, right\), got 'ab'"),
    "kvcache cache_seqlens float": (lambda: mfa_hf.flash_attn_with_kvcache(*cache(), cache_seqlens=3.0), TypeError,
                                    r"cache_seqlens: expected a \(B,\) int32 tensor, an int .*got 3.0"),
    "kvcache cache_seqlens list": (lambda: mfa_hf.flash_attn_with_kvcache(*cache(), cache_seqlens=[1, 2]), TypeError,
                                   r"cache_seqlens: expected a \(B,\) int32 tensor, an int .*got \[1, 2\]"),
    "kvcache num_splits float": (lambda: mfa_hf.flash_attn_with_kvcache(*cache(), num_splits=2.0), ValueError,
                                 r"num_splits: expected an int >= 0 .*got 2.0"),
    "chunk_size float": (lambda: mfa_hf.flash_attention_chunked(*bhsd(), chunk_size=2.0), ValueError,
                         r"chunk_size: expected an int >= 1, got 2.0"),
    "allocate batch str": (lambda: mfa_hf.allocate_kv_cache("2", 4, 2, 64), TypeError,
                           r"batch: expected an int >= 0, got '2'"),
    "allocate max_seqlen float": (lambda: mfa_hf.allocate_kv_cache(1, 4.0, 2, 64, "int8"), TypeError,
                                  r"max_seqlen: expected an int >= 0, got 4.0"),
    "allocate head_dim 0": (lambda: mfa_hf.allocate_kv_cache(1, 4, 2, 0, "int8"), ValueError,
                            r"head_dim: expected an int >= 1, got 0"),
    "allocate negative batch": (lambda: mfa_hf.allocate_kv_cache(-1, 4, 2, 64), ValueError,
                                r"batch: expected an int >= 0, got -1"),
    "allocate nf4 group_size 2-D": (lambda: mfa_hf.allocate_kv_cache(1, 4, 2, 64, "nf4", group_size=torch.ones(2)),
                                    TypeError, r"group_size: expected 32 or 64 for nf4, got a 1-D"),
    "allocate int8 group_size": (lambda: mfa_hf.allocate_kv_cache(1, 4, 2, 64, "int8", group_size=32), ValueError,
                                 r"group_size: expected None for int8 \(only nf4 has groups\), got 32"),
    "quantize_kv group_size tensor": (lambda: mfa_hf.quantize_kv(torch.randn(1, 4, 2, 64), "nf4",
                                                                 group_size=torch.ones(2)), ValueError,
                                      r"group_size: expected an int or None, got a 1-D"),
    "quantize_kv_nf4 group_size float": (lambda: mfa_hf.quantize_kv_nf4(torch.randn(1, 2, 4, 64), group_size=32.0),
                                         ValueError, r"group_size: expected an int or None, got 32.0"),
    # -- the quantized cache's options ------------------------------------------------------------------------
    "MFAQuantizedCache nf4 group 48": (lambda: mfa_hf.MFAQuantizedCache(format="nf4", group_size=48), ValueError,
                                       r"group_size: expected 32 or 64 for nf4 \(or None: 64\), got 48"),
    "MFAQuantizedCache int8 group 48": (lambda: mfa_hf.MFAQuantizedCache(format="int8", group_size=48), ValueError,
                                        r"group_size: expected None for int8 .*got 48"),
    "MFAQuantizedCache residual float": (lambda: mfa_hf.MFAQuantizedCache(residual_length=1.5), ValueError,
                                         r"residual_length: expected an int >= 0, got 1.5"),
    "MFAQuantizedLayer sliding_window str": (lambda: _quantized_layer(sliding_window="4"), ValueError,
                                             r"sliding_window: expected an int >= 1, got '4'"),
    "MFAQuantizedLayer sliding_window 0": (lambda: _quantized_layer(sliding_window=0), ValueError,
                                           r"sliding_window: expected an int >= 1, got 0"),
    # -- meta tensors: no values to read ------------------------------------------------------------------------
    "varlen cu_seqlens on meta": (lambda: _varlen(cu_seqlens_k=meta(packed()[3])), ValueError,
                                  r"cu_seqlens_k: expected device cpu like q, got meta"),
    "kvcache cache on meta": (lambda: (lambda q, kc, vc: mfa_hf.flash_attn_with_kvcache(q, meta(kc), meta(vc)))(*cache()),
                              ValueError, r"k_cache: expected device cpu like q, got meta"),
    "dropout_seed on meta": (lambda: mfa_hf.flash_attn_func(*qkv(), dropout_p=0.1, dropout_seed=meta(torch.tensor(3))),
                             TypeError, r"dropout_seed: expected an int or a 1-element integer tensor, got .* on meta"),
    "quantize_kv scales on meta": (lambda: mfa_hf.quantize_kv(torch.randn(1, 4, 2, 64), "int8",
                                                              scales=meta(torch.ones(1, 1, 2, 1))), ValueError,
                                   r"scales: expected device cpu like x, got meta"),
    # -- wrong dtypes ------------------------------------------------------------------------------------------
    "kvcache complex q": (lambda: (lambda q, kc, vc: mfa_hf.flash_attn_with_kvcache(q.to(torch.complex64), kc, vc))(
        *cache()), ValueError, r"q: expected a 4-D float tensor .*complex64"),
    "QuantizedKV dtype int": (lambda: mfa_hf.QuantizedKV(torch.ones(1, 1, 1, 8, dtype=torch.int8), torch.ones(1, 1, 1, 1),
                                                         "int8", 8, torch.int32), TypeError,
                              r"QuantizedKV.dtype: expected a float torch.dtype .*got torch.int32"),
    "allocate dtype int": (lambda: mfa_hf.allocate_kv_cache(1, 4, 2, 64, "int8", dtype=torch.int32), TypeError,
                           r"dtype: expected a float torch.dtype .*got torch.int32"),
    "quantize_kv scales int": (lambda: mfa_hf.quantize_kv(torch.randn(1, 4, 2, 64), "int8",
                                                          scales=torch.ones(1, 1, 2, 1, dtype=torch.int32)), TypeError,
                               r"scales: expected dtype torch.float32, got torch.int32"),
    "int8 codes float": (lambda: (lambda c, s: mfa_hf.flash_attention_int8(torch.randn(1, 2, 8, 64), c.float(), c, s, s))(
        *_int8_codes()), TypeError, r"k_codes: expected dtype torch.int8 for int8, got torch.float32"),
    # -- wrong shapes and values ------------------------------------------------------------------------------------
    "kvcache head dim 0": (lambda: mfa_hf.flash_attn_with_kvcache(*cache(d=0)), ValueError,
                           r"q: expected a head dim >= 1, got shape \(2, 1, 4, 0\)"),
    "quantize_kv scales shape": (lambda: mfa_hf.quantize_kv(torch.randn(1, 4, 2, 64), "int8",
                                                            scales=torch.ones(1, 1, 3, 1)), ValueError,
                                 r"scales: expected shape \(B, S, H, G\) = \(1 or 1, 4 or 1, 2, 1\), got \(1, 1, 3, 1\)"),
    "quantize_kv bhsd scales shape": (lambda: mfa_hf.quantize_kv(torch.randn(1, 2, 4, 64), "int8", layout="bhsd",
                                                                 scales=torch.ones(1, 3, 1, 1)), ValueError,
                                      r"scales: expected shape \(B, H, S, G\) = \(1 or 1, 2, 4 or 1, 1\), got \(1, 3, 1, 1\)"),
    "quantize_kv zero scale": (lambda: mfa_hf.quantize_kv(torch.randn(1, 4, 2, 64), "int8", granularity="head",
                                                          scales=torch.zeros(1, 1, 2, 1)), ValueError,
                               r"scales: expected finite values > 0, got 0.0"),
    "static_scales shape": (lambda: mfa_hf.allocate_kv_cache(1, 4, 2, 64, "int8", static_scales=torch.ones(1, 1, 3, 1)),
                            ValueError, r"static_scales: expected shape \(1 or 1, 1, 2, 1 or 64\), got \(1, 1, 3, 1\)"),
    "int8 k_scale shape": (lambda: (lambda c, s: mfa_hf.flash_attention_int8(torch.randn(1, 2, 8, 64), c, c, s[:, :, :4],
                                                                             s))(*_int8_codes()), ValueError,
                           r"k_scale: expected shape \(1 or 1, 2, 8 or 1, G\) to match k_codes"),
    # -- not a tensor --------------------------------------------------------------------------------------------------
    "chunked attn_mask list": (lambda: mfa_hf.flash_attention_chunked(*bhsd(), attn_mask=[[True]], chunk_size=2),
                               TypeError, r"attn_mask: expected a torch.Tensor or None, got list"),
    "quantize_kv scales list": (lambda: mfa_hf.quantize_kv(torch.randn(1, 4, 2, 64), "int8", scales=[1.0]), TypeError,
                                r"scales: expected a float32 tensor \(B, S, H, G\) or None, got list"),
    "static_scales list": (lambda: mfa_hf.allocate_kv_cache(1, 4, 2, 64, "int8", static_scales=[1.0]), TypeError,
                           r"static_scales: expected a 4-D float32 tensor.*got list"),
    "int8 q None": (lambda: (lambda c, s: mfa_hf.flash_attention_int8(None, c, c, s, s))(*_int8_codes()), TypeError,
                    r"q: expected a float tensor \(B, H, Lq, D\), got NoneType"),
    # -- the SDPA patch's gate ----------------------------------------------------------------------------------------
    "sdpa devices None": (lambda: mfa_hf.replace_sdpa(devices=None), TypeError,
                          r"devices: expected a tuple of device types .*got None"),
    "sdpa devices with index": (lambda: mfa_hf.sdpa_patched(devices=("cuda:0",)).__enter__(), ValueError,
                                r"devices: expected device types without an index .*got 'cuda:0'; use 'cuda'"),
    "sdpa devices unknown": (lambda: mfa_hf.replace_sdpa(devices=("gpu",)), ValueError,
                             r"devices: expected device types torch knows .*got 'gpu'"),
    "sdpa min_scores float": (lambda: mfa_hf.replace_sdpa(min_scores=1.5), ValueError,
                              r"min_scores: expected an int >= 0 .*got 1.5"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_every_entry_point_names_the_bad_argument(name):
    call, error, match = BAD[name]
    try:
        with pytest.raises(error, match=match):
            call()
    finally:
        from mfa_hf.integrations import sdpa_patch

        assert not sdpa_patch.is_patched(), "a refused gate must not patch"


def test_int_likes_and_real_numbers_are_accepted():
    """numpy scalars and 0-d tensors are numbers; they give what the plain Python number gives."""
    np = pytest.importorskip("numpy")
    q, k, v = qkv()
    want = mfa_hf.flash_attn_func(q, k, v, window_size=(2, 0), softcap=5.0, softmax_scale=0.3)
    for window, softcap, scale in (((np.int64(2), np.int32(0)), np.float32(5.0), np.float64(0.3)),
                                   ((torch.tensor(2), torch.tensor(0)), torch.tensor(5.0), torch.tensor(0.3))):
        got = mfa_hf.flash_attn_func(q, k, v, window_size=window, softcap=softcap, softmax_scale=scale)
        torch.testing.assert_close(got, want)
    qb, kb, vb = bhsd()
    torch.testing.assert_close(mfa_hf.flash_attention(qb, kb, vb, is_causal=True, window_size=np.int64(3)),
                               mfa_hf.flash_attention(qb, kb, vb, is_causal=True, window_size=3))
    qc, kc, vc = cache()
    torch.testing.assert_close(mfa_hf.flash_attn_with_kvcache(qc, kc, vc, cache_seqlens=np.int64(5), num_splits=np.int64(1)),
                               mfa_hf.flash_attn_with_kvcache(qc, kc, vc, cache_seqlens=5, num_splits=1))
    qv, kv, vv, cu = packed()
    torch.testing.assert_close(mfa_hf.flash_attn_varlen_func(qv, kv, vv, cu, cu, np.int64(4), torch.tensor(4)),
                               mfa_hf.flash_attn_varlen_func(qv, kv, vv, cu, cu, 4, 4))


def test_varlen_on_meta_gives_the_output_shape():
    """As in FlashAttention-2, sizes come from the shapes and max_seqlen: meta offsets (no values) are
    not read, and the call returns meta outputs."""
    q, k, v, cu = (meta(t) for t in packed())
    out, lse = mfa_hf.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, return_lse=True)
    assert out.is_meta and out.shape == q.shape[:-1] + (v.shape[-1],) and lse.shape == (q.shape[1], q.shape[0])


def test_kvcache_on_meta_gives_the_output_shape():
    """Meta tensors carry shapes only: the call validates what it can and returns meta outputs."""
    q, kc, vc = (meta(t) for t in cache())
    new = meta(torch.zeros(2, 1, 2, 8))
    lengths = meta(torch.tensor([1, 2], dtype=torch.int32))
    out, lse = mfa_hf.flash_attn_with_kvcache(q, kc, vc, k=new, v=new, cache_seqlens=lengths, return_lse=True,
                                              cache_batch_idx=meta(torch.tensor([1, 0], dtype=torch.int32)))
    assert out.is_meta and out.shape == (2, 1, 4, 8) and lse.shape == (2, 4, 1)


def test_flags_generators_and_sizes_of_every_entry_point():
    """Found by a fuzzing pass: return_lse took any truthy value, a wrong generator failed inside torch.randint,
    chunk_size refused __index__ values the README promises, and zero query rows broke the chunked path."""
    q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))
    with pytest.raises(TypeError, match=r"return_lse: expected a bool, got 'no'"):
        mfa_hf.flash_attn_func(q, k, v, return_lse="no")
    with pytest.raises(TypeError, match=r"return_lse: expected a bool, got 'no'"):
        mfa_hf.flash_attn_with_kvcache(q[:, :1], k, v, return_lse="no")
    with pytest.raises(TypeError, match=r"generator: expected a torch.Generator or None, got int"):
        mfa_hf.flash_attn_func(q, k, v, dropout_p=0.1, generator=5)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    whole = mfa_hf.flash_attention(qh, kh, vh, is_causal=True)
    for size in (numpy.int64(2), torch.tensor(2)):
        torch.testing.assert_close(mfa_hf.flash_attention_chunked(qh, kh, vh, is_causal=True, chunk_size=size), whole)
    for size in (0, 2.0, True):
        with pytest.raises(ValueError, match=r"chunk_size: expected an int >= 1"):
            mfa_hf.flash_attention_chunked(qh, kh, vh, chunk_size=size)
    empty = mfa_hf.flash_attention_chunked(qh[:, :, :0], kh, vh, chunk_size=2)
    assert empty.shape == (1, 2, 0, 8)


def _alibi_calls(slopes):
    """Every entry point that takes ALiBi slopes, each with q requiring grad (a training call)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 6, 2, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 6, 2, 8, generator=g) for _ in range(2))
    cu = torch.tensor([0, 6], dtype=torch.int32)
    return {
        "flash_attn_func": lambda: mfa_hf.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes),
        "flash_attn_varlen_func": lambda: mfa_hf.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 6, 6, causal=True,
                                                                        alibi_slopes=slopes),
        "flash_attention": lambda: mfa_hf.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                          is_causal=True, alibi_slopes=slopes),
        "flash_attn_with_kvcache": lambda: mfa_hf.flash_attn_with_kvcache(q, k, v, alibi_slopes=slopes),
    }


@pytest.mark.parametrize("entry", list(_alibi_calls(None)))
def test_alibi_slopes_requiring_grad_are_refused(entry):
    """No kernel computes a gradient for the slopes: slopes requiring grad were accepted and their .grad stayed
    None (a learnable slope silently trained as a constant). Refused naming alibi_slopes; detached slopes and
    no_grad calls are served."""
    slopes = torch.rand(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"alibi_slopes: expected fixed slopes .*requiring grad"):
        _alibi_calls(slopes)[entry]()
    assert _alibi_calls(slopes.detach())[entry]() is not None
    with torch.no_grad():
        assert _alibi_calls(slopes)[entry]() is not None


@pytest.mark.parametrize("call, error, match", [
    # softcap / scale beyond float32: a cap of 1e39 became inf in the kernels and every output NaN
    (lambda q, k, v: mfa_hf.flash_attn_func(q, k, v, softcap=1e39), ValueError, "softcap: .*float32's range"),
    (lambda q, k, v: mfa_hf.flash_attn_func(q, k, v, softmax_scale=-1e39), ValueError,
     "softmax_scale: .*float32's range"),
    (lambda q, k, v: mfa_hf.flash_attn_with_kvcache(q, k, v, softcap=1e39), ValueError, "softcap"),
    (lambda q, k, v: mfa_hf.flash_attention(q, k, v, scale=1e39), ValueError, "scale"),
    # decode accepted float8 q and caches, returning a float8 output no other entry point gives
    (lambda q, k, v: mfa_hf.flash_attn_with_kvcache(q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn),
                                                    v.to(torch.float8_e4m3fn)), TypeError, "q: expected float16"),
    (lambda q, k, v: mfa_hf.allocate_kv_cache(1, 4, 1, 8, dtype=torch.float8_e4m3fn), TypeError, "dtype: expected"),
    # torch's own device-string error did not name the argument
    (lambda q, k, v: mfa_hf.allocate_kv_cache(1, 4, 1, 8, device="nope"), ValueError, "device: expected"),
])
def test_values_beyond_what_the_kernels_compute_are_refused(call, error, match):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 2, 8, generator=g) for _ in range(3))
    with pytest.raises(error, match=match):
        call(q, k, v)
    assert not mfa_hf.flash_attn_func(q, k, v, softcap=3e38).isnan().any()  # the largest float32 cap is served


def test_quantized_kv_takes_a_numpy_group_size():
    """Ints are anything with __index__ (README): QuantizedKV refused numpy's, which quantize_kv accepts."""
    packed = mfa_hf.quantize_kv(torch.randn(1, 4, 2, 64), "nf4")
    again = mfa_hf.QuantizedKV(packed.codes, packed.scales, "nf4", numpy.int64(packed.group_size))
    assert type(again.group_size) is int and torch.equal(again.dequantize(), packed.dequantize())


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dropout_seed="abc"), TypeError, "dropout_seed"),
    (dict(generator="x"), TypeError, "generator"),
    (dict(dropout_seed=7, generator=torch.Generator()), ValueError, "dropout_seed, generator: expected one of them"),
])
def test_dropout_arguments_are_checked_at_every_probability(dropout_p, kwargs, error, match):
    """A wrong kind of seed or generator was accepted (and ignored) at dropout_p=0, and a generator given beside
    a seed was silently ignored."""
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    with pytest.raises(error, match=match):
        mfa_hf.flash_attn_func(q, k, v, dropout_p=dropout_p, **kwargs)


def _scalar_calls(name, value):
    """Every entry point that takes a number argument `name` (softmax_scale / scale, softcap), with q requiring
    grad (a training call), given `value`."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 2, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 6, 2, 8, generator=g) for _ in range(2))
    cu = torch.tensor([0, 6], dtype=torch.int32)
    bhsd = name if name != "softmax_scale" else "scale"
    return {
        "flash_attn_func": lambda: mfa_hf.flash_attn_func(q, k, v, causal=True, **{name: value}),
        "flash_attn_varlen_func": lambda: mfa_hf.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 6, 6, causal=True,
                                                                        **{name: value}),
        "flash_attention": lambda: mfa_hf.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                          is_causal=True, **{bhsd: value}),
        "flash_attention_chunked": lambda: mfa_hf.flash_attention_chunked(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, **{bhsd: value}),
        "flash_attn_with_kvcache": lambda: mfa_hf.flash_attn_with_kvcache(q, k, v, **{name: value}),
    }


@pytest.mark.parametrize("name, number", [("softmax_scale", 0.3), ("softcap", 5.0)])
@pytest.mark.parametrize("entry", list(_scalar_calls("softcap", 1.0)))
def test_number_tensors_requiring_grad_are_refused(entry, name, number):
    """A 0-d tensor is taken for a number, read as a float: one requiring grad got no gradient (a learnable scale
    or softcap silently trained as a constant; session 25). Refused naming the argument; detached tensors and
    no_grad calls are served."""
    value = torch.tensor(number, requires_grad=True)
    call = _scalar_calls(name, value)[entry]
    named = name.replace("softmax_", "") if entry.startswith("flash_attention") else name  # (B, H, S, D) names
    with pytest.raises(ValueError, match=rf"{named}: expected a fixed number .*requiring grad"):
        call()
    assert _scalar_calls(name, value.detach())[entry]() is not None
    with torch.no_grad():
        assert call() is not None
