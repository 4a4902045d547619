"""kernels/triton/tma.py: the forward's K/V tiles read through TMA descriptors give bitwise the pointer loads'
outputs (and so the same gradients, which the backward computes from the forward's output and LSE), and layouts
the hardware cannot take, kernels that do not build with descriptors, and threads without Triton's allocator are
all served.

The descriptor path is run through Triton's interpreter here (MFA_TRITON_TMA=1 allows it there), in a
child process because interpretation is decided when mfa_hf is imported; on a CUDA machine the same
comparison runs on the GPU. What could go wrong is what the descriptor replaces: the bounds (rows past a
sequence, columns past the head dim, the next sequence of a packed batch) and the addressing (GQA heads,
batch and sequence strides, a head dim that is not a power of two), so the memory past each sequence
holds NaN: a row read from there would turn the output NaN.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from mfa_hf.kernels.triton import tma  # noqa: E402

# (name, dtype, batch, Lq, Lk, Hq, Hkv, D, Dv, keyword arguments of flash_attn_func)
CASES = [
    ("plain", torch.float16, 2, 37, 53, 4, 2, 64, 64, {}),
    ("causal_gqa", torch.bfloat16, 2, 33, 70, 4, 2, 64, 64, {"causal": True}),
    ("mqa_window", torch.float16, 1, 40, 40, 4, 1, 32, 32, {"window_size": (9, 3)}),
    ("odd_dims", torch.float16, 2, 20, 70, 2, 2, 40, 24, {"causal": True}),
    ("float32_softcap_sinks", torch.float32, 1, 18, 45, 2, 1, 16, 16, {"softcap": 5.0, "sinks": "sinks"}),
    ("additive_mask", torch.float16, 2, 17, 29, 2, 2, 32, 32, {"attn_mask": "mask"}),
]


def _tensors(case, device, seed=0):
    name, dtype, batch, lq, lk, hq, hkv, d, dv, kwargs = case
    g = torch.Generator().manual_seed(seed)
    q_buf = torch.full((batch, lq + 24, hq, d), float("nan"), dtype=dtype)
    q_buf[:, :lq] = torch.randn(batch, lq, hq, d, generator=g).to(dtype)
    # Q/K/V are the first positions of longer buffers whose tail is NaN: a descriptor whose bounds were
    # wrong would read it.
    k_buf = torch.full((batch, lk + 24, hkv, d), float("nan"), dtype=dtype)
    v_buf = torch.full((batch, lk + 24, hkv, dv), float("nan"), dtype=dtype)
    k_buf[:, :lk] = torch.randn(batch, lk, hkv, d, generator=g).to(dtype)
    v_buf[:, :lk] = torch.randn(batch, lk, hkv, dv, generator=g).to(dtype)
    args = dict(kwargs)
    if args.get("sinks") == "sinks":
        args["sinks"] = torch.randn(hq, generator=g).to(device)
    if args.get("attn_mask") == "mask":
        args["attn_mask"] = torch.randn(batch, 1, lq, lk, generator=g).to(device, dtype)
    return q_buf.to(device)[:, :lq], k_buf.to(device)[:, :lk], v_buf.to(device)[:, :lk], args


def _varlen(device, dtype=torch.float16):
    """Three packed sequences; the keys past the last one are NaN (each sequence's descriptor has its own
    bounds, so the last one's stand for all)."""
    g = torch.Generator().manual_seed(3)
    lens_q, lens_k = [5, 19, 1], [23, 7, 40]
    q = _nan_tailed(torch.randn(sum(lens_q), 4, 64, generator=g), "cpu", dtype)
    k = torch.full((sum(lens_k) + 16, 2, 64), float("nan"), dtype=dtype)
    v = torch.full((sum(lens_k) + 16, 2, 64), float("nan"), dtype=dtype)
    k[:sum(lens_k)] = torch.randn(sum(lens_k), 2, 64, generator=g).to(dtype)
    v[:sum(lens_k)] = torch.randn(sum(lens_k), 2, 64, generator=g).to(dtype)
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    total = sum(lens_k)  # the views end with the last sequence; the NaN rows lie past it in memory
    return (q.to(device), k.to(device)[:total], v.to(device)[:total], cu(lens_q), cu(lens_k), max(lens_q),
            max(lens_k))


def _run(mode: str, device: str) -> dict:
    """{case: (output and gradients as lists, whether the forward plan chose TMA)} with MFA_TRITON_TMA=mode."""
    import mfa_hf
    from mfa_hf.kernels.triton import forward

    os.environ["MFA_TRITON_TMA"] = mode
    results = {}

    def record(name, attend, *inputs):
        leaves = [t.detach().requires_grad_() for t in inputs]  # detach keeps the storage: the NaN tails stay
        out = attend(*leaves)
        grad = _nan_tailed(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)), out.device, out.dtype)
        grads = torch.autograd.grad(out, leaves, grad)
        chose = [plan.options["TMA"] for plan in forward._plans.values()]
        results[name] = ([t.float().cpu().tolist() for t in (out, *grads)], chose[-1])

    for case in CASES:
        forward.forget_plans()
        q, k, v, args = _tensors(case, device)
        record(case[0], lambda q, k, v: mfa_hf.flash_attn_func(q, k, v, **args), q, k, v)
    forward.forget_plans()
    q, k, v, cu_q, cu_k, max_q, max_k = _varlen(device)
    record("varlen", lambda q, k, v: mfa_hf.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True),
           q, k, v)
    # A data pointer off by one element: no descriptor can take it, the pointer loads serve it.
    forward.forget_plans()
    q, k, v, _ = _tensors(CASES[0], device)
    shifted = torch.empty(k.numel() + 1, dtype=k.dtype, device=device)[1:].view(k.shape)
    shifted.copy_(k)
    record("unaligned", lambda q, k, v: mfa_hf.flash_attn_func(q, k, v), q, shifted, v)
    forward.forget_plans()
    return results


def _nan_tailed(values: torch.Tensor, device, dtype) -> torch.Tensor:
    """`values` in a buffer with NaN rows after it along dim 0 (a read past the end would show)."""
    buffer = torch.full((values.shape[0] + 8, *values.shape[1:]), float("nan"), dtype=dtype)
    buffer[:values.shape[0]] = values.to(dtype)
    return buffer.to(device)[:values.shape[0]]


def _compare(pointer: dict, descriptor: dict) -> None:
    for name, (out, chose) in pointer.items():
        assert not chose, f"{name}: MFA_TRITON_TMA=0 still chose TMA"
        tma_out, tma_chose = descriptor[name]
        assert tma_chose == (name != "unaligned"), f"{name}: expected TMA {'off' if name == 'unaligned' else 'on'}"
        for part, got, want in zip(("out", "dq", "dk", "dv"), tma_out, out):
            got, want = torch.tensor(got), torch.tensor(want)
            assert got.isfinite().all(), f"{name} {part}: the descriptor path read past a sequence (NaN)"
            assert torch.equal(got, want), f"{name} {part}: TMA differs from the pointer loads by {(got - want).abs().max()}"


def test_descriptor_path_matches_pointer_loads_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", MFA_BACKEND="triton")
    done = subprocess.run([sys.executable, __file__], env=env, cwd=Path(__file__).parents[2], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    both = json.loads(done.stdout.strip().splitlines()[-1])
    _compare(both["0"], both["1"])


def _gpu_with_tma(monkeypatch):
    from mfa_hf.kernels.triton import blocks

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if blocks.interpreting():
        pytest.skip("the interpreter run covers this process")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs compute capability 9.0")
    monkeypatch.setenv("MFA_BACKEND", "triton")


def test_descriptor_path_matches_pointer_loads_on_the_gpu(monkeypatch):
    _gpu_with_tma(monkeypatch)
    _compare(_run("0", "cuda"), _run("1", "cuda"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_the_tables_tma_entries_build_and_match_pointer_loads(dtype, monkeypatch):
    """Every head dim that pads onto a TMA entry of the block table (N past SMALL_N), causal or not, with GQA:
    the default (descriptors) builds and gives bitwise the pointer loads' output."""
    import mfa_hf
    from mfa_hf.kernels.triton import blocks, forward

    _gpu_with_tma(monkeypatch)
    n = blocks.SMALL_N + 77
    for dim in (72, 80, 96, 128):
        for causal in (False, True):
            g = torch.Generator(device="cuda").manual_seed(dim)
            q = torch.randn(2, n, 4, dim, device="cuda", dtype=dtype, generator=g)
            k, v = (torch.randn(2, n, 2, dim, device="cuda", dtype=dtype, generator=g) for _ in range(2))
            outs = {}
            for mode in ("auto", "0"):
                monkeypatch.setenv("MFA_TRITON_TMA", mode)
                forward.forget_plans()
                outs[mode] = mfa_hf.flash_attn_func(q, k, v, causal=causal)
                chose = [plan.options["TMA"] for plan in forward._plans.values()]
                assert chose == [mode == "auto" and blocks.forward_blocks(dim, dtype, causal, "cuda", n).tma]
            forward.forget_plans()
            assert torch.equal(outs["auto"], outs["0"]), (dim, causal)


def test_a_new_thread_gets_the_descriptor_scratch_allocator(monkeypatch):
    """Triton's allocator lives in a context variable a new thread starts without (generate() in a
    TextIteratorStreamer thread): the first TMA launch there must still run, with the same result."""
    import threading

    import mfa_hf
    from mfa_hf.kernels.triton import forward

    _gpu_with_tma(monkeypatch)
    monkeypatch.setenv("MFA_TRITON_TMA", "1")
    forward.forget_plans()
    q, k, v, _ = _tensors(CASES[0], "cuda")
    here = mfa_hf.flash_attn_func(q, k, v)
    there, errors = [], []

    def worker():
        try:
            there.append(mfa_hf.flash_attn_func(q, k, v))
            torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    chose = [plan.options["TMA"] for plan in forward._plans.values()]
    forward.forget_plans()
    assert not errors, errors
    assert chose and all(chose), "the call did not take the descriptor path"
    assert torch.equal(there[0], here)


_BUFFER = torch.zeros(2 * 64 * 4 * 80 + 8, dtype=torch.float16)
_LAYOUTS = {  # name -> (strides of a (2, 64, 4, 64) view, element offset into _BUFFER, accepted)
    "contiguous": ((64 * 256, 256, 64, 1), 0, True),
    "broadcast_batch": ((0, 256, 64, 1), 0, True),
    "padded_rows": ((64 * 320, 320, 80, 1), 8, True),
    "unit_last_stride_missing": ((64 * 256, 256, 64, 2), 0, False),
    "odd_row_stride": ((64 * 260, 260, 64, 1), 0, False),
    "odd_head_stride": ((64 * 288, 288, 65, 1), 0, False),
    "odd_batch_stride": ((64 * 256 + 4, 256, 64, 1), 0, False),
    "unaligned_pointer": ((64 * 256, 256, 64, 1), 1, False),
}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
def test_layouts_the_hardware_cannot_take_are_refused(layout, monkeypatch):
    """16-byte aligned base, 16-byte multiples for every stride but the last, unit last stride."""
    monkeypatch.setenv("MFA_TRITON_TMA", "1")  # CPU tensors count as capable under =1
    strides, offset, accepted = _LAYOUTS[layout]
    k = _BUFFER.as_strided((2, 64, 4, 64), strides, offset)
    plain = torch.zeros(2, 64, 4, 64, dtype=torch.float16)
    assert tma.chosen(True, k, plain, strides, tuple(plain.stride())) == accepted
    assert tma.chosen(True, plain, k, tuple(plain.stride()), strides) == accepted


def test_off_switch_and_table_preference(monkeypatch):
    base = torch.zeros(2, 64, 4, 64, dtype=torch.float16)
    strides = tuple(base.stride())
    monkeypatch.setenv("MFA_TRITON_TMA", "0")
    assert not tma.chosen(True, base, base, strides, strides)
    monkeypatch.setenv("MFA_TRITON_TMA", "1")
    assert tma.chosen(False, base, base, strides, strides)  # =1 overrides the table
    monkeypatch.setenv("MFA_TRITON_TMA", "auto")
    assert not tma.chosen(True, base, base, strides, strides)  # no hardware on CPU


if __name__ == "__main__":  # the interpreter child: both modes, as JSON
    device = "cpu"
    print(json.dumps({mode: _run(mode, device) for mode in ("0", "1")}))


def test_a_kernel_that_does_not_build_with_tma_takes_the_pointer_loads():
    """ptxas crashed on some TMA block shapes (triton 3.6): the launch falls back, says so, and reports it."""
    from triton.runtime.errors import PTXASError

    ran = []

    def broken():
        raise PTXASError("`ptxas` failed with error code -11")

    with pytest.warns(RuntimeWarning, match="pointer loads"):
        assert tma.launch(True, broken, lambda: ran.append("pointer")) is False
    assert ran == ["pointer"]
    assert tma.launch(True, lambda: ran.append("tma"), lambda: ran.append("pointer")) is True
    assert tma.launch(False, lambda: ran.append("plain"), lambda: ran.append("pointer")) is True
    assert ran == ["pointer", "tma", "plain"]


def test_other_errors_are_not_swallowed():
    def failing():
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        tma.launch(True, failing, lambda: None)


def test_a_thread_without_an_allocator_gets_ours_once(monkeypatch):
    """Triton's refusal for want of an allocator: ours is set and the launch repeated (nothing had run)."""
    import triton

    given, attempts = [], []
    monkeypatch.setattr(triton, "set_allocator", given.append)

    def launch():
        attempts.append(1)
        if not given:
            raise RuntimeError("Kernel requires a runtime memory allocation, but no allocator was set.")

    assert tma.launch(True, launch, lambda: None) is True
    assert len(attempts) == 2 and len(given) == 1
