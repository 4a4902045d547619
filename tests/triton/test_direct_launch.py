"""kernels/triton/direct_launch.py: the key it reuses a compiled kernel under is never coarser than
Triton's own specialization (checked against Triton's specializer, anywhere), and on a GPU every
launcher gives bitwise the JIT path's results over the layouts that change Triton's specialization:
unaligned data pointers, unit and 16-multiple strides, lengths that grow from call to call."""

from __future__ import annotations

import itertools

import pytest
import torch

from mfa_hf.kernels.triton import direct_launch

triton = pytest.importorskip("triton")


def _triton_classes(arg):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native_specialize_impl(BaseBackend, arg, False, True, True)


def _arguments():
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, -(2**31), -(2**31) - 16,
            2**40, 2**40 + 1, 2**63 - 16, 2**63, 2**64 - 16]
    base = torch.zeros(64, dtype=torch.float32)
    tensors = [base, base[1:], base[4:], base[8:], base.view(torch.int32), base.view(torch.float16)[2:],
               base.view(torch.bfloat16), base.view(torch.uint8)[16:], base.view(torch.uint8)[3:]]
    return ints + [0.0, 1.0, 2.5, True, False, None] + tensors


def test_key_refines_triton_specialization():
    """Any two arguments that share a direct-launch key share Triton's specialization (the reverse
    may fail: a finer key only costs a compile-cache lookup)."""
    args = _arguments()
    for a, b in itertools.combinations(args, 2):
        if direct_launch._plain_key((a,)) == direct_launch._plain_key((b,)):
            assert _triton_classes(a) == _triton_classes(b), (a, b)


def test_constexpr_positions_are_keyed_by_value():
    """A constexpr passed positionally must be keyed by its value (two head dims, both multiples of 16,
    have the same int class but are different kernels)."""

    class Param:
        def __init__(self, name, constexpr):
            self.name, self.is_constexpr, self.default = name, constexpr, __import__("inspect").Parameter.empty

    class FakeJit:
        params = [Param("x", False), Param("n", False), Param("HEAD", True)]
        pre_run_hooks: list = []

    launcher = direct_launch.DirectLauncher(FakeJit())
    assert launcher._first_constexpr == 2
    t = torch.zeros(4)
    key64 = (direct_launch._plain_key((t, 32)), (64,))
    key128 = (direct_launch._plain_key((t, 32)), (128,))
    assert key64 != key128


class _Chain:
    """A launch hook chain as Triton's knobs hold one."""

    def __init__(self, *calls):
        self.calls = list(calls)


class _FakeCompiled:
    """A compiled kernel with the pieces the fast launch uses, recording which way each launch went."""

    function, packed_metadata = "function-handle", ("warps", "ctas", "shared")

    def __init__(self):
        self.fired = []

    def run(self, *launch):
        self.fired.append(("C launcher", launch))

    def __getitem__(self, grid):
        return lambda *args: self.fired.append(("runner", (grid, args)))


@pytest.mark.parametrize("hooks", ["empty chains", "None", "enter chain in use", "exit chain in use",
                                   "a plain function", "no triton runtime"])
@pytest.mark.parametrize("way", ["call", "bound"])
def test_fast_launch_only_while_no_launch_hook_listens(hooks, way, monkeypatch):
    """With no launch hook installed a launch calls the C launcher with the runner's arguments (the device's
    current stream, the function, the packed metadata, no launch metadata, no hooks); with any hook
    installed, or without Triton's runtime knobs, it goes through CompiledKernel[grid] so the hook sees it."""

    class Runtime:
        launch_enter_hook, launch_exit_hook = _Chain(), _Chain()

    if hooks == "None":
        Runtime.launch_enter_hook = Runtime.launch_exit_hook = None
    elif hooks == "enter chain in use":
        Runtime.launch_enter_hook = _Chain(print)
    elif hooks == "exit chain in use":
        Runtime.launch_exit_hook = _Chain(print)
    elif hooks == "a plain function":
        Runtime.launch_enter_hook = print
    found = None if hooks == "no triton runtime" else (Runtime, lambda device: f"stream of {device}")
    monkeypatch.setattr(direct_launch, "_RUNTIME", [found])
    compiled = _FakeCompiled()
    fire = direct_launch._Fire(compiled)
    if way == "call":
        fire((4, 2, 1), 3, ("q", 7), ("tail",))
    else:
        fire.bound((4, 2, 1), 3)("q", 7, "tail")
    fast = hooks in ("empty chains", "None")
    expected = (("C launcher", (4, 2, 1, "stream of 3", "function-handle", ("warps", "ctas", "shared"), None, None,
                                None, "q", 7, "tail"))
                if fast else ("runner", ((4, 2, 1), ("q", 7, "tail"))))
    assert compiled.fired[-1] == expected
    with direct_launch.through_runner():  # benchmarks' A/B switch: the runner whatever the hooks
        fire((4, 2, 1), 3, ("q", 7), ("tail",))
    assert compiled.fired[-1] == ("runner", ((4, 2, 1), ("q", 7, "tail")))
    assert direct_launch._RUNTIME == [found]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="direct launches run on a CUDA device")


def _both_paths(monkeypatch, run):
    """run() with the direct launcher, then with Triton's JIT path."""
    monkeypatch.setenv("MFA_BACKEND", "triton")
    monkeypatch.setenv("MFA_TRITON_DIRECT_LAUNCH", "1")
    fast = [run() for _ in range(2)]  # the second call is the one served from the key table
    monkeypatch.setenv("MFA_TRITON_DIRECT_LAUNCH", "0")
    slow = run()
    return fast, slow


def _assert_bitwise(fast, slow):
    for got in fast:
        for x, y in zip(got, slow):
            assert torch.equal(x, y) or (x.isnan() == y.isnan()).all() and torch.equal(x.nan_to_num(), y.nan_to_num())


@needs_cuda
@pytest.mark.parametrize("offset", [0, 1, 3, 8], ids=lambda o: f"offset{o}")
@pytest.mark.parametrize("dim", [64, 80, 128])
def test_forward_backward_match_jit(offset, dim, monkeypatch):
    """Storage offsets move q/k/v off 16-byte alignment; dims change stride classes."""
    import mfa_hf

    g = torch.Generator(device="cuda").manual_seed(offset * 1000 + dim)

    def tensor(n):
        flat = torch.randn(offset + 2 * n * 4 * dim, generator=g, device="cuda", dtype=torch.bfloat16)
        return flat[offset:].view(2, n, 4, dim).requires_grad_()

    q, k, v = tensor(37), tensor(53), tensor(53)
    grad = torch.randn(2, 37, 4, dim, generator=g, device="cuda", dtype=torch.bfloat16)

    def run():
        out = mfa_hf.flash_attn_func(q, k, v, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), grad))

    fast, slow = _both_paths(monkeypatch, run)
    _assert_bitwise(fast, slow)
    from mfa_hf.kernels.triton import backward, forward

    for launcher in (forward._FORWARD, backward._DELTA, backward._BACKWARD_KV, backward._BACKWARD_Q):
        assert launcher._by_known, "a planned launch never kept a compiled kernel"


@needs_cuda
def test_dropout_forward_matches_jit(monkeypatch):
    """Dropout passes a per-call seed: the launcher keys it by value, not by the plan."""
    import mfa_hf

    q = torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.float16)

    def run():
        torch.manual_seed(3)
        return (mfa_hf.flash_attn_func(q, q, q, dropout_p=0.2),)

    fast, slow = _both_paths(monkeypatch, run)
    _assert_bitwise(fast, slow)


@needs_cuda
@pytest.mark.parametrize("kv_format", ["none", "int8", "fp8_e4m3", "nf4"])
def test_decode_over_growing_cache_matches_jit(kv_format, monkeypatch):
    """A cache that grows by one key per step changes lengths (and strides of a (B, H, S, D) view):
    each step, direct and JIT launches agree bitwise, and the key table stays small."""
    import mfa_hf
    from mfa_hf.kernels.triton import decode as triton_decode

    g = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(2, 1, 8, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    before = len(triton_decode._SPLIT._by_class)
    for length in (255, 256, 257, 1000, 1024, 4097):
        k = torch.randn(2, length, 2, 128, generator=g, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(2, length, 2, 128, generator=g, device="cuda", dtype=torch.bfloat16)
        if kv_format != "none":
            k, v = mfa_hf.quantize_kv(k, kv_format), mfa_hf.quantize_kv(v, kv_format)

        def run(k=k, v=v):
            return mfa_hf.flash_attn_with_kvcache(q, k, v)

        fast, slow = _both_paths(monkeypatch, lambda: _as_tuple(run()))
        _assert_bitwise(fast, slow)
    assert len(triton_decode._SPLIT._by_class) > before and triton_decode._SPLIT._by_known


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


@needs_cuda
def test_installed_launch_hook_sees_every_launch(monkeypatch):
    """A launch hook (a profiler such as Proton) installed after kernels were kept still sees the forward's
    direct launches and its replays; removed again, launches go on without it."""
    import mfa_hf
    from triton import knobs

    monkeypatch.setenv("MFA_BACKEND", "triton")
    monkeypatch.setenv("MFA_TRITON_DIRECT_LAUNCH", "1")
    q = torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
    expected = mfa_hf.flash_attn_func(q, q, q, causal=True)
    for _ in range(2):
        mfa_hf.flash_attn_func(q, q, q, causal=True)  # kept, then replayed
    seen = []

    def hook(metadata):
        seen.append(metadata)

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        for _ in range(3):
            assert torch.equal(mfa_hf.flash_attn_func(q, q, q, causal=True), expected)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(seen) == 3
    assert torch.equal(mfa_hf.flash_attn_func(q, q, q, causal=True), expected) and len(seen) == 3
