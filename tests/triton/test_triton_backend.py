"""The triton backend against the float64 reference: on CPU through Triton's interpreter (CI), or on
a CUDA GPU with MFA_TRITON_FULL=1 (every case of the shared matrix, nothing marked slow):

    MFA_TRITON_FULL=1 python -m pytest tests/triton -q          # on a CUDA machine
    bash benchmarks/triton/full_matrix.sh                       # the same, one worker per core (xdist)
    python -m pytest tests/triton -q [--run-slow]               # anywhere, interpreter

The interpreter runs each kernel program in numpy (seconds per case), so the default run takes a
seventh of the core matrix plus targeted cases; --run-slow (MFA_SLOW=1) runs the rest. Triton decides
interpretation when a kernel is decorated, i.e. when mfa_hf is imported; a pytest process started
without TRITON_INTERPRET=1 therefore runs this file again in a child process that has it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

import mfa_hf
from mfa_hf import dispatch, trace
from mfa_hf.kernels.reference import attention_reference
from mfa_hf.problem import AttentionProblem
from mfa_hf.testing import (
    Case,
    assert_close_to_reference,
    check_against_reference,
    core_cases,
    full_cases,
    functorch_vjp,
)

from mfa_hf.kernels.triton import blocks
from mfa_hf.kernels.triton import forward_kernel as triton_forward

FULL = os.environ.get("MFA_TRITON_FULL") == "1"
DEVICE = "cuda" if FULL else "cpu"
INTERPRETED = isinstance(triton_forward.attention_forward_kernel, InterpretedFunction)


@pytest.fixture(autouse=True)
def triton_backend(request, monkeypatch):
    """Force the triton backend (on CPU, through the interpreter)."""
    if request.node.name == "test_interpreter_child_process":
        return
    if FULL and not torch.cuda.is_available():
        pytest.fail("MFA_TRITON_FULL=1 needs a CUDA device; none is visible")
    if FULL:
        _spread_xdist_workers_over_gpus()
    if not FULL and not INTERPRETED:
        pytest.skip("runs in test_interpreter_child_process (TRITON_INTERPRET=1 was not set at import)")
    monkeypatch.setenv("MFA_BACKEND", "triton")


def _spread_xdist_workers_over_gpus():
    """Under pytest-xdist, worker gwN runs on GPU N mod count: compilation (one set of kernels per feature
    combination, on the CPU) is what the full matrix waits for, so one worker per core, the GPUs shared."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw"):
        torch.cuda.set_device(int(worker[2:]) % torch.cuda.device_count())


def test_interpreter_child_process(request):
    """Without TRITON_INTERPRET at import, run this file in a child process that has it."""
    if FULL or INTERPRETED:
        pytest.skip("this process already runs the cases itself")
    env = dict(os.environ, TRITON_INTERPRET="1")
    args = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    if request.config.getoption("--run-slow", default=False):
        args.append("--run-slow")
    done = subprocess.run(args, env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True)
    assert done.returncode == 0, f"interpreter run failed (rc {done.returncode}):\n{done.stdout[-8000:]}{done.stderr[-2000:]}"
    assert " passed" in done.stdout, f"expected passing cases in the child run, got:\n{done.stdout[-2000:]}"


def slow_unless_full(cases):
    return [pytest.param(c, id=c.id, marks=() if FULL else pytest.mark.slow) for c in cases]


def check(case: Case, seed: int = 0, **kwargs):
    check_against_reference(case, backend="triton", seed=seed, device=DEVICE, **kwargs)


CORE = core_cases()
SAMPLED = CORE[::7]  # 16 cases; 7 is coprime with every period of the grid, so all vary


@pytest.mark.parametrize("case", SAMPLED, ids=lambda c: c.id)
def test_core_sample(case):
    check(case)


@pytest.mark.parametrize("case", CORE[5::54], ids=lambda c: c.id)
def test_gradients_under_functorch(case):
    """torch.func.vjp through the triton kernels (the op's transform-form autograd, ops.py) gives the
    reference's gradients."""
    check(case, vjp=functorch_vjp(case, "triton"))


GPU_BLOCK_CASES = [  # one case per forward entry of the CUDA tables a 2-byte D 128 / 64 call meets (blocks.py)
    Case(dtype=torch.bfloat16, batch=1, lq=70, lk=90, heads_q=4, heads_kv=2, dim=128, dim_v=128, causal=True,
         window=(40, 0), mask="bool"),                                               # short, causal: (64, 32)
    Case(dtype=torch.float16, batch=1, lq=100, lk=70, heads_q=2, heads_kv=1, dim=128, dim_v=128, mask="additive",
         softcap=3.0),                                                               # short, non-causal: (64, 32)
    Case(dtype=torch.bfloat16, batch=1, lq=530, lk=530, heads_q=1, heads_kv=1, dim=128, dim_v=128, sinks=True),
    Case(dtype=torch.float16, batch=1, lq=45, lk=110, heads_q=2, heads_kv=2, dim=64, dim_v=64, causal=True,
         alibi=True),
]


@pytest.mark.parametrize("case", GPU_BLOCK_CASES, ids=lambda c: c.id)
def test_gpu_forward_blocks_give_the_reference(case, monkeypatch):
    """The interpreter's own blocks are tiny (blocks._TINY); here the forward takes the CUDA tables' entry for
    the case (padding, causal bands, masks and features across its tile edges), so a table change is checked on
    any machine. Warps and stages only pipeline on a GPU: the GPU run checks those."""
    from mfa_hf.kernels.triton import forward as triton_launch

    taken = []

    def cuda_table(dim, dtype, causal, device_type="cuda", seqlen_q=0):
        taken.append(blocks.forward_blocks(dim, dtype, causal, "cuda", seqlen_q))
        return taken[-1]

    monkeypatch.setattr(triton_launch, "forward_blocks", cuda_table)
    triton_launch.forget_plans()
    try:
        check(case, gradients=False)
        assert taken and all(b != blocks._TINY and b.block_m > 16 for b in taken), taken
    finally:
        monkeypatch.undo()
        triton_launch.forget_plans()


@pytest.mark.parametrize("case", slow_unless_full([c for n, c in enumerate(CORE) if n % 7]))
def test_core_rest(case):
    check(case)


@pytest.mark.parametrize("case", slow_unless_full(full_cases()))
def test_full_matrix(case):
    check(case, seed=7)


@pytest.mark.parametrize("dim, dim_v", [(256, 256), (128, 64), (1, 3)])
def test_head_dims(dim, dim_v):
    check(Case(dtype=torch.bfloat16, lq=19, lk=33, dim=dim, dim_v=dim_v, causal=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_same_mask_as_reference(dtype):
    case = Case(dtype=dtype, lq=30, lk=41, causal=True, sinks=True, dropout_p=0.3)
    check(case, dropout_seed=torch.tensor(3_000_000_019))  # > 2**31: the hash's uint32 path


@pytest.mark.parametrize("used", ["both", "out", "lse"])
def test_fully_masked_rows_and_grad_lse(used):
    """Rows with nothing visible: output 0, LSE -inf, finite gradients; grad flows through the output, the LSE,
    or both (an unused output reaches the backward as None)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, n, 2, 16, generator=g).to(DEVICE).requires_grad_() for n in (6, 3, 3))
    out, lse = mfa_hf.flash_attn_func(q, k, v, causal=True, return_lse=True)  # rows 0..2 see no key
    assert torch.equal(out[:, :3].detach().cpu(), torch.zeros(1, 3, 2, 16))
    assert bool(torch.isneginf(lse[:, :, :3]).all())

    def loss(o, l):
        return {"both": o.sum() + l[:, :, 3:].sum(), "out": o.sum(), "lse": l[:, :, 3:].sum()}[used]

    ours = torch.autograd.grad(loss(out, lse), (q, k, v))
    ref_args = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_reference(*ref_args, causal=True)
    want = torch.autograd.grad(loss(ref_out, ref_lse), ref_args, materialize_grads=True)  # the LSE has no dV
    for a, b in zip(ours, want):
        assert torch.allclose(a.cpu().double(), b, atol=1e-4), "gradient differs from float64"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bf16_backward_takes_delta_from_the_unrounded_grad(dtype, monkeypatch):
    """Under bf16_backward the dK/dV and dQ kernels read bfloat16 copies of Q, K, V and dO, but delta =
    rowsum(dO * O) must come from dO as it arrived: its rounding is no part of the mode. The gradients' tolerance
    cannot tell the two apart (bfloat16 operands move them as much), so the delta launch's dO is checked itself."""
    from mfa_hf.kernels.triton import backward

    seen = []
    launch = backward._DELTA.launch

    def spy(grid, args, kwargs, **rest):
        seen.append(args[1])
        return launch(grid, args, kwargs, **rest)

    monkeypatch.setattr(backward._DELTA, "launch", spy)
    monkeypatch.setenv("MFA_BACKEND", "triton")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 20, 2, 16, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(1, 20, 2, 16, generator=g).to(DEVICE, dtype)
    out = mfa_hf.flash_attn_func(q, k, v, causal=True, bf16_backward=True)
    torch.autograd.grad(out, (q, k, v), grad)
    assert len(seen) == 1 and seen[0].dtype == dtype and torch.equal(seen[0], grad), "delta read a rounded dO"


def _packed(lengths, heads, dim, dtype, generator):
    total = sum(lengths)
    x = torch.randn(total, heads, dim, generator=generator).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return x, cu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_matches_per_sequence_reference(dtype):
    g = torch.Generator().manual_seed(11)
    lengths_q, lengths_k = [5, 0, 23, 17], [9, 4, 23, 0]
    q, cu_q = _packed(lengths_q, 4, 24, dtype, g)
    k, cu_k = _packed(lengths_k, 2, 24, dtype, g)
    v, _ = _packed(lengths_k, 2, 24, dtype, g)
    sinks = torch.randn(4, generator=g)
    leaves = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    out, lse = mfa_hf.flash_attn_varlen_func(*leaves, cu_q.to(DEVICE), cu_k.to(DEVICE), max(lengths_q),
                                             max(lengths_k), causal=True, sinks=sinks.to(DEVICE), return_lse=True)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(out, leaves, grad.to(DEVICE))
    for b in range(len(lengths_q)):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if rows.stop == rows.start:
            continue
        _check_sequence(out, lse, grads, q, k, v, sinks, grad, rows, keys)


def _check_sequence(out, lse, grads, q, k, v, sinks, grad, rows, keys):
    parts = [t[None, s] for t, s in ((q, rows), (k, keys), (v, keys))]
    ref_in = [p.double().requires_grad_() for p in parts]
    base_in = [p.clone().requires_grad_() for p in parts]
    ref, ref_lse = attention_reference(*ref_in, sinks=sinks.double(), causal=True)
    base, base_lse = attention_reference(*base_in, sinks=sinks, causal=True, upcast=False)
    assert_close_to_reference(out[rows].cpu()[None], ref, base, name="out")
    assert_close_to_reference(lse[:, rows].cpu()[None], ref_lse, base_lse, name="lse")
    if ref.numel() == 0 or keys.stop == keys.start:
        assert bool((grads[0][rows] == 0).all()), "dq of a sequence without keys must be 0"
        return
    want = torch.autograd.grad(ref, ref_in, grad[None, rows].double())
    base_grads = torch.autograd.grad(base, base_in, grad[None, rows])
    slices = (rows, keys, keys)
    for name, ours, w, bg, s in zip("qkv", grads, want, base_grads, slices):
        # 1e-3 absolute covers FlashAttention's rounded-delta effect at these magnitudes.
        assert_close_to_reference(ours[s].cpu()[None], w, bg, 3.0, f"d{name}", algorithmic=1e-3)


def test_additive_mask_gradient_broadcast():
    """A (1, 1, Lq, Lk) additive mask's gradient is dS summed over batch and heads."""
    case = Case(dtype=torch.float32, lq=21, lk=18, mask="additive", sinks=True)
    check(case, seed=2)


@pytest.fixture
def kv_keys_as_rows(monkeypatch):
    """The dK/dV kernel with its tile as keys x queries (backward.KV_KEYS_AS_ROWS, off by default until timed)."""
    from mfa_hf.kernels.triton import backward, forward

    monkeypatch.setattr(backward, "KV_KEYS_AS_ROWS", True)
    forward.forget_plans()  # plans hold the switch
    yield
    monkeypatch.undo()
    forward.forget_plans()


# Every feature the dK/dV step touches in its other orientation: the sampled core grid (masks, ALiBi, softcap,
# windows, GQA, sinks, dtypes), dropout, packed sequences, an additive mask's gradient, head dims D != Dv.
@pytest.mark.parametrize("case", SAMPLED + [Case(dtype=torch.bfloat16, lq=19, lk=33, dim=128, dim_v=64, causal=True)],
                         ids=lambda c: c.id)
def test_backward_with_keys_as_rows_gives_the_reference(case, kv_keys_as_rows):
    check(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_with_keys_as_rows_dropout_and_packed(dtype, kv_keys_as_rows):
    test_dropout_same_mask_as_reference(dtype)
    test_varlen_matches_per_sequence_reference(torch.float16 if dtype == torch.bfloat16 else dtype)
    test_additive_mask_gradient_broadcast()


def _problem(**overrides) -> AttentionProblem:
    fields = dict(device_type="cuda", dtype=torch.bfloat16, batch=1, seqlen_q=8, seqlen_k=8, heads_q=2,
                  heads_kv=2, head_dim_qk=64, head_dim_v=64)
    fields.update(overrides)
    return AttentionProblem(**fields)


def test_supports_reasons(monkeypatch):
    triton_backend = dispatch.backend("triton")
    assert triton_backend.supports(_problem()) == (True, "the triton kernels serve this problem")
    ok, reason = triton_backend.supports(_problem(dtype=torch.float64))
    assert not ok and "float64" in reason
    for fmt in ("int8", "nf4", "fp8_e4m3", "fp8_e5m2", "int8+nf4", "none"):
        assert triton_backend.supports(_problem(kv_format=fmt))[0], f"kv_format {fmt}: expected supported"
    ok, reason = triton_backend.supports(_problem(kv_format="int8+q4_0"))
    assert not ok and "q4_0" in reason
    monkeypatch.setattr(blocks, "_INTERPRETING", False)  # read once at import, as Triton does
    ok, reason = triton_backend.supports(_problem(device_type="cpu"))
    assert not ok and "cpu" in reason


def test_forced_triton_raises_with_reason_for_float64():
    q = torch.randn(1, 4, 1, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(mfa_hf.BackendUnavailable, match="float64"):
        mfa_hf.flash_attn_func(q, q, q)


def test_sequence_lengths_do_not_recompile():
    if not FULL:
        pytest.skip("compilation happens on CUDA only (the interpreter compiles nothing)")
    from mfa_hf.kernels.triton import forward_kernel as fwd

    def run(n):
        x = torch.randn(1, n, 2, 64, device="cuda", dtype=torch.bfloat16)
        mfa_hf.flash_attn_func(x, x, x, causal=True)

    run(100)
    run(4096)  # blocks.py has a short-sequence table (<= SMALL_N) and a long one: two variants at most
    caches = fwd.attention_forward_kernel.device_caches  # triton 3.x: device -> (kernel cache, ...)
    before = sum(len(entry[0]) for entry in caches.values())
    for n in (37, 128, 1000, 1025, 3000, 4096):
        run(n)
    after = sum(len(entry[0]) for entry in caches.values())
    assert after == before, f"expected no new compilations across lengths, got {after - before}"


def test_tensors_on_a_gpu_that_is_not_current():
    """Triton launches on the current device; layers of a model spread over GPUs hold their tensors on
    others. Forward, backward and decode on cuda:1 while cuda:0 is current equal the same calls made
    with cuda:1 current."""
    if not FULL or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (MFA_TRITON_FULL=1)")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 70, 4, 64, generator=g, dtype=torch.bfloat16) for _ in range(3))
    cache = torch.randn(2, 300, 2, 64, generator=g, dtype=torch.bfloat16)
    lengths = torch.tensor([300, 123], dtype=torch.int32)

    def run(current):
        torch.cuda.set_device(current)
        leaves = [t.to("cuda:1").requires_grad_() for t in (q, k, v)]
        out = mfa_hf.flash_attn_func(*leaves, causal=True)
        out.float().square().sum().backward()
        with torch.no_grad():
            decoded = mfa_hf.flash_attn_with_kvcache(q[:, :1].to("cuda:1"), cache.to("cuda:1"), cache.to("cuda:1"),
                                                     cache_seqlens=lengths.to("cuda:1"))
        torch.cuda.synchronize(1)
        return [t.cpu() for t in (out.detach(), *(leaf.grad for leaf in leaves), decoded)]

    expected, got = run(1), run(0)
    for name, want, have in zip(("out", "dq", "dk", "dv", "decode"), expected, got):
        assert torch.equal(want, have), f"{name}: results differ when cuda:0 is current"


# ---------------------------------------------------------------------------------------------
# Decode (flash_attn_with_kvcache) over plain and quantized caches, against the float64 reference
# on the dequantized cache (tests/test_kvcache.py's method): ragged lengths, every format.

FORMATS = (None, "fp8_e4m3", "fp8_e5m2", "int8", "nf4")
DECODE_FEATURES = ({}, {"softcap": 3.0, "alibi": True}, {"sinks": True, "window": (9, -1)}, {"batch_idx": True},
                   {"causal": False, "window": (6, 3), "sinks": True}, {"num_splits": 1, "alibi": True},
                   {"num_splits": 5, "softcap": 2.0, "sinks": True})
DECODE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DECODE_HEADS = ((4, 2), (4, 1), (6, 2))
CACHE_ROWS, MAX_SEQLEN = 5, 80


def _decode_cases():
    cases = []
    for n, (fmt, lq) in enumerate((f, lq) for f in FORMATS for lq in (1, 4)):
        cases.append(dict(k_format=fmt, v_format=fmt, lq=lq, dtype=DECODE_DTYPES[n % 3], heads=DECODE_HEADS[n % 3],
                          **DECODE_FEATURES[n % len(DECODE_FEATURES)]))
    cases += [
        # static scales: per channel for keys (a scale per element of D), per head for values
        dict(k_format="int8", v_format="fp8_e4m3", k_granularity="channel", v_granularity="head", lq=1),
        dict(k_format="fp8_e5m2", v_format="int8", k_granularity="channel", lq=4, dtype=torch.bfloat16),
        dict(k_format="int8", v_format="int8", lq=4, dtype=torch.float16, sinks=True, heads=(6, 2)),
        # mixed formats; nf4 with 2 and 4 scale groups along D
        dict(k_format="nf4", v_format="int8", group_size=32, lq=1, dtype=torch.bfloat16, sinks=True),
        dict(k_format="nf4", v_format="nf4", dim=128, lq=1, dtype=torch.bfloat16, heads=(8, 2)),
        dict(k_format="int8", v_format="nf4", group_size=32, lq=4, causal=False, alibi=True, batch_idx=True),
        # a sequence with no key at all (no append, length 0): output 0, LSE -inf
        dict(k_format="int8", v_format="int8", lq=1, append=False, lengths=(0, 45, 80)),
        # a longer query (quantized prefill-like: several query tiles, one split)
        dict(k_format="fp8_e4m3", v_format="fp8_e4m3", lq=21, dtype=torch.bfloat16, heads=(2, 1), lengths=(3, 30, 50)),
    ]
    return cases


def _case_id(c):
    parts = [f"{c['k_format'] or 'plain'}" + ("" if c["k_format"] == c["v_format"] else f"+{c['v_format']}"),
             f"q{c['lq']}", str(c.get("dtype", torch.float32)).replace("torch.", ""),
             "h{}-{}".format(*c.get("heads", (4, 2)))]
    for key in ("softcap", "alibi", "sinks", "window", "batch_idx", "num_splits", "k_granularity", "group_size",
                "dim"):
        if c.get(key) not in (None, False, 0):
            parts.append(f"{key}{c[key]}".replace(" ", "").replace("True", ""))
    if c.get("causal") is False:
        parts.append("full")
    return "-".join(parts)


def _quantize(content, fmt, granularity, group_size):
    if fmt is None:
        return content
    return mfa_hf.quantize_kv(content, fmt, granularity=granularity or "token",
                              group_size=group_size if fmt == "nf4" else None)


def _dense(cache, dtype):
    return cache.dequantize(dtype) if isinstance(cache, mfa_hf.QuantizedKV) else cache.to(dtype)


def _to(cache, device):
    if isinstance(cache, mfa_hf.QuantizedKV):
        return mfa_hf.QuantizedKV(cache.codes.to(device), cache.scales.to(device), cache.format, cache.group_size,
                                  cache.dtype)
    return cache.to(device)


def check_decode(c: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dtype, (hq, hkv), dim, lq = c.get("dtype", torch.float32), c.get("heads", (4, 2)), c.get("dim", 64), c["lq"]
    batch_idx = c.get("batch_idx", False)
    rows = CACHE_ROWS if batch_idx else 3
    caches = []
    # magnitudes: "q_scale" (one per batch row), "q_head_scale" (one per query head) and "k_scale" multiply the
    # random q and keys
    q_scale = torch.tensor(c.get("q_scale", (1.0, 1.0, 1.0))).view(3, 1, 1, 1) \
        * torch.tensor(c.get("q_head_scale", (1.0,) * hq)).view(1, 1, hq, 1)
    side_scale = {"k": c.get("k_scale", 1.0), "v": 1.0}
    for side in ("k", "v"):
        content = (torch.randn(rows, MAX_SEQLEN, hkv, dim, generator=g) * side_scale[side]).to(dtype)
        caches.append(_quantize(content, c[f"{side}_format"], c.get(f"{side}_granularity"), c.get("group_size")))
    append = c.get("append", True)
    lengths = torch.tensor(c.get("lengths", (0, 37, MAX_SEQLEN - lq)), dtype=torch.int32)
    q = (torch.randn(3, lq, hq, dim, generator=g) * q_scale).to(dtype)
    new_k, new_v = ((torch.randn(3, lq, hkv, dim, generator=g) * side_scale[side]).to(dtype) if append else None
                    for side in ("k", "v"))
    idx = torch.tensor([4, 0, 2], dtype=torch.int32) if batch_idx else None
    sinks = torch.randn(hq, generator=g) if c.get("sinks") else None
    slopes = torch.rand(hq, generator=g) * 0.3 if c.get("alibi") else None
    window, causal, softcap = c.get("window", (-1, -1)), c.get("causal", True), c.get("softcap", 0.0)
    dev = [None if t is None else _to(t, DEVICE) for t in (q, *caches, new_k, new_v, lengths, idx, sinks, slopes)]
    with trace.capture() as calls:
        out, lse = mfa_hf.flash_attn_with_kvcache(
            dev[0], dev[1], dev[2], dev[3], dev[4], cache_seqlens=dev[5], cache_batch_idx=dev[6], causal=causal,
            window_size=window, softcap=softcap, sinks=dev[7], alibi_slopes=dev[8], return_lse=True,
            num_splits=c.get("num_splits", 0))
    assert trace.served_by(calls)[("triton", "decode")] == 1, f"expected the triton decode op, got {calls}"
    out, lse = out.cpu(), lse.cpu()
    totals = (lengths + (lq if append else 0)).tolist()
    cache_rows = idx.tolist() if batch_idx else [0, 1, 2]
    refs = {}
    for upcast in (True, False):
        # the cache after the call holds the appended tokens: read them back from it
        kd, vd = (_dense(_to(cache, "cpu"), torch.float64 if upcast else dtype) for cache in dev[1:3])
        outs, lses = [], []
        for b, (row, total) in enumerate(zip(cache_rows, totals)):
            qb = q[b : b + 1].to(torch.float64 if upcast else dtype)
            ref_out, ref_lse = attention_reference(
                qb, kd[row : row + 1, :total], vd[row : row + 1, :total], causal=causal, window_size=window,
                softcap=softcap, sinks=sinks, alibi_slopes=slopes, upcast=upcast)
            outs.append(ref_out)
            lses.append(ref_lse)
        refs[upcast] = (torch.cat(outs), torch.cat(lses))
    factor = 3.0 if softcap else 2.0
    assert_close_to_reference(out, refs[True][0], refs[False][0], factor, "out")
    assert_close_to_reference(lse, refs[True][1], refs[False][1], factor, "lse")
    return out, lse, totals


@pytest.mark.parametrize("c", _decode_cases(), ids=_case_id)
def test_decode_matches_reference(c):
    out, lse, totals = check_decode(c)
    for b, total in enumerate(totals):
        if total == 0 and not c.get("sinks"):
            assert bool((out[b] == 0).all()), f"row {b} sees no key: expected output 0, got {out[b].flatten()[:4]}"
            assert bool(torch.isneginf(lse[b]).all()), f"row {b} sees no key: expected LSE -inf, got {lse[b]}"


# The split kernel's launch switch keys_as_rows (the dots' orientation, decode_kernel._mm) flipped from the defaults
# (decode.py); every quantized format, each scale mode (per token, per channel, nf4 groups), multi-row query tiles.
_OTHER_ORIENTATION_CASES = [c for c in _decode_cases() if c["lq"] == 4 or c["k_format"] == "nf4"
                            or c.get("k_granularity")]


@pytest.mark.parametrize("c", _OTHER_ORIENTATION_CASES, ids=_case_id)
def test_decode_with_the_launch_switches_flipped(c, monkeypatch):
    """keys_as_rows flipped from each table's default gives the reference too."""
    from mfa_hf.kernels.triton import decode as td

    for table in (td.DECODE_CONFIG, td.DECODE_CONFIG_QUANT):
        monkeypatch.setitem(table, "keys_as_rows", not table.get("keys_as_rows", False))
    td._plans.clear()  # plans are made from the tables once per kind of call
    try:
        check_decode(c)
    finally:
        td._plans.clear()


HARDWARE_TANH_CASES = [
    Case(dtype=torch.float16, softcap=3.0, causal=True),
    Case(dtype=torch.bfloat16, softcap=30.0, window=(7, 0), lq=50, lk=50),
    Case(dtype=torch.float16, lq=50, lk=37, softcap=2.0, mask="additive", sinks=True),
]


@pytest.fixture
def hardware_tanh(monkeypatch):
    if not FULL:
        pytest.skip("tanh.approx is PTX: it runs on a GPU only (the interpreter keeps the exact tanh)")
    from mfa_hf.kernels.triton import binding, decode as td, forward

    monkeypatch.setattr(binding, "HARDWARE_TANH", True)
    forward.forget_plans()
    td._plans.clear()
    td._SPLIT.forget()
    yield
    monkeypatch.undo()
    forward.forget_plans()
    td._plans.clear()
    td._SPLIT.forget()


@pytest.mark.parametrize("case", HARDWARE_TANH_CASES, ids=lambda c: c.id)
def test_softcap_with_hardware_tanh_gives_the_reference(case, hardware_tanh):
    """binding.HARDWARE_TANH (the softcap's tanh.approx.f32 for float16/bfloat16): forward and gradients within the
    tolerance rule."""
    check(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_softcap_with_hardware_tanh_gives_the_reference(dtype, hardware_tanh):
    check_decode(dict(k_format="int8", v_format="int8", lq=1, dtype=dtype, softcap=3.0, heads=(4, 2)))
    check_decode(dict(k_format=None, v_format=None, lq=4, dtype=dtype, softcap=30.0, heads=(6, 2)))


@pytest.mark.parametrize("seed", range(4))
def test_fp8_e5m2_values_keep_precision_in_half_dots(seed):
    """fp8_e5m2 scales are absmax / 57344: probabilities times such a scale fell below float16's normal range
    before the value dot (up to 1.4x the allowed error, a third of the seeds of a sweep); they are lifted by 2^8
    and the output divided back in float32."""
    check_decode(dict(k_format="fp8_e5m2", v_format="fp8_e5m2", lq=1, dtype=torch.float16, dim=32, heads=(4, 2),
                      causal=False), seed=seed)


@pytest.mark.parametrize("k_format", ["fp8_e4m3", "fp8_e5m2", "nf4", "int8"])
def test_bfloat16_queries_past_float16_range_in_half_dots(k_format, monkeypatch):
    """A bfloat16 q meets quantized keys in a float16 dot (on the GPU every quantized format, int8 through the PTX
    conversions); float16 ends at 65504, so a row whose |q| reaches 2^15 is scaled down by a power of two before the
    dot and its scores back up (decode_kernel._fit_half, one factor a tile of query heads). Rows of |q| up to ~1e1,
    ~4e5 and ~1e7 over keys ~1e-5 (scores of order 1-100), and heads of one token from 1e-2 to 1e6 sharing a tile:
    each within the tolerance rule, where the float16 q overflowed to inf (NaN rows). The
    interpreter takes float16 dots for bfloat16 only with its float32 "upcast" turned off, and then only where both
    sides are fp8 or nf4 (without the PTX conversions int8 codes meet q in its own dtype, and the interpreter's
    bfloat16 dot is wrong: common.dot): there the values are fp8 and int8 keys are left to the GPU."""
    from mfa_hf.kernels.triton import decode as td

    if not FULL:
        if k_format == "int8":
            pytest.skip("int8 keys take float16 dots only through the PTX conversions (GPU)")
        monkeypatch.setattr(td, "dot_precision", lambda dtype, device: "tf32")
    td._plans.clear()  # a plan keeps the dot precision it was made with
    try:
        for seed in range(2):
            case = dict(k_format=k_format, v_format="int8" if FULL else "fp8_e4m3", lq=1, dtype=torch.bfloat16,
                        heads=(4, 2), k_scale=1e-5)
            check_decode(dict(case, q_scale=(10.0, 4e5, 1e7)), seed=seed)
            check_decode(dict(case, q_head_scale=(1e6, 1e-2, 3.0, 5e4)), seed=seed)
    finally:
        td._plans.clear()


def test_decode_splits_from_shape_only():
    """The split count depends on the shape (batch x KV heads, cache capacity), never on the lengths."""
    from mfa_hf.kernels.triton import decode as td

    device = torch.device(DEVICE)
    policy = td.split_policy(device)
    chosen = {policy.splits(8 * 8, capacity, 64) for capacity in (65536,)}
    assert len(chosen) == 1
    assert policy.splits(8 * 8, 65536, 64, requested=3) == 3
    assert policy.splits(8 * 8, 100, 64, requested=30) == 2, "splits beyond the key blocks are capped"
    assert policy.splits(1, 10**6, 64, requested=1000) == policy.max_splits


def test_decode_lengths_do_not_recompile():
    if not FULL:
        pytest.skip("compilation happens on CUDA only (the interpreter compiles nothing)")
    from mfa_hf.kernels.triton import decode_kernel as dec

    cache = torch.randn(2, 8192, 2, 128, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(2, 1, 8, 128, device="cuda", dtype=torch.bfloat16)

    def run(n):
        lengths = torch.tensor([n, max(0, n - 7)], dtype=torch.int32, device="cuda")
        mfa_hf.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lengths)

    def compiled():
        return sum(len(entry[0]) for kernel in (dec.decode_split_kernel, dec.decode_merge_kernel)
                   for entry in kernel.device_caches.values())

    run(100)
    before = compiled()
    for n in (1, 37, 1000, 4096, 8191):
        run(n)
    assert compiled() == before, f"expected no new compilations across lengths, got {compiled() - before}"


def test_decode_clamps_trusted_indices():
    """cache_seqlens and cache_batch_idx reach the kernel unread (issue 17: no device -> host reads): values
    outside the cache are clamped into it in-kernel (undefined results as in FlashAttention-2, never an
    out-of-bounds read): lengths to [0, capacity], rows to [0, cache rows)."""
    from mfa_hf.kernels.triton import decode as td

    device = torch.device(DEVICE)
    q = torch.randn(2, 1, 4, 16, device=device)
    cache_k, cache_v = torch.randn(3, 8, 2, 16, device=device), torch.randn(3, 8, 2, 16, device=device)

    def run(lengths, rows):
        from mfa_hf.kernels.contract import DecodeCall

        return td.decode(DecodeCall.from_op_args((
            q, cache_k, None, cache_v, None, torch.tensor(lengths, dtype=torch.int32, device=device),
            torch.tensor(rows, dtype=torch.int32, device=device), None, None, "none", "none", 16, 16, 0.25, -1, 0,
            0.0, 1)))

    bad_out, bad_lse = run([50, -3], [7, -2])
    good_out, good_lse = run([8, 0], [2, 0])
    torch.testing.assert_close(bad_out, good_out)
    torch.testing.assert_close(bad_lse, good_lse)
