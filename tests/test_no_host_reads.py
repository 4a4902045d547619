"""Issue 17 (item 4): the API path reads no device values back to the host.

On mps and cuda every read of a device tensor's values (`.tolist()`, `.item()`, `int(t)`, `bool(t)`,
`torch.equal`, a copy to the CPU) waits for the device's whole queue, once per layer per step. This
machine has neither device, so the calls run on fake tensors (FakeTensorMode): they carry shapes,
dtypes and a device but no values, and any value read raises. A recording mode on top names the read,
and catches copies to the CPU (which fake tensors would allow). The device is "fakegpu", a Python-only
device (PrivateUse1, registered here): not the CPU, so the API treats it as mps/cuda, and indexing works
on it (fake "mps"/"cuda" tensors refuse `t[...]` in a torch built without them). Fake "cuda" runs the
calls that need no indexing, and reaches the triton backend's ops. Backend ops are recorded as
one call: what a backend does inside its op is its own business (the torch fallback reads offsets
there; tests/test_torch_backend.py and the kernels' tests cover the backends).

Value checks did not disappear: CPU tensors are always checked, and MFA_CHECK_VALUES=1 checks device
tensors too (problem.values_checked says why this is a switch and not torch._assert_async).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import mfa_hf
from mfa_hf import kvcache
from mfa_hf.integrations.flash_attn_shim import interface as shim
from mfa_hf.integrations.transformers import fa_surface

aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.item.default, aten.equal.default, aten.is_nonzero.default}
FAKE_DEVICE = "fakegpu"


# Registering the device is for good: it becomes torch's current accelerator for the whole process
# (torch.get_device_module() then returns its stub, which broke transformers' continuous batching in
# later tests). So the tests that need it run in a fresh Python (test_fake_device_cases_in_a_fresh_python).
IN_CHILD = os.environ.get("MFA_NO_HOST_READS_CHILD") == "1"


def _fake_device() -> str:
    """Register the Python-only device once per process (PrivateUse1 can be named only once)."""
    if not IN_CHILD:
        pytest.skip("runs in a fresh Python (see test_fake_device_cases_in_a_fresh_python)")
    name = torch._C._get_privateuse1_backend_name()
    if name == "privateuseone":
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        _setup_privateuseone_for_python_backend(FAKE_DEVICE)
    elif name != FAKE_DEVICE:
        pytest.skip(f"PrivateUse1 is already taken by {name!r} in this process")
    return FAKE_DEVICE


@pytest.fixture(params=["fakegpu", "cuda"])
def device(request):
    return _fake_device() if request.param == "fakegpu" else request.param


@pytest.fixture
def fake_device():
    return _fake_device()


class HostReads(TorchDispatchMode):
    """Records every op that brings a non-CPU tensor's values to the host."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS or self._to_cpu(func, args, kwargs):
            self.reads.append(str(func))
        return func(*args, **kwargs)

    @staticmethod
    def _to_cpu(func, args, kwargs) -> bool:
        if func is aten._to_copy.default:  # .cpu(), .to("cpu"), .to(device="cpu", ...)
            source, target = args[0], kwargs.get("device")
        elif func is aten.copy_.default:  # cpu_tensor.copy_(device_tensor)
            target, source = args[0].device, args[1]
        else:
            return False
        return source.device.type != "cpu" and target is not None and torch.device(target).type == "cpu"


def run_without_reads(device: str, make_args, call):
    """Build fake `device` tensors with make_args(device) and run call(*args) recording host reads.
    Returns the result; fails naming the reads (a read that raises is reported as such)."""
    with FakeTensorMode():
        args = make_args(device)
        with HostReads() as recorder:
            try:
                result = call(*args)
            except Exception as error:  # a value read on a fake tensor raises (DataDependentOutputException)
                pytest.fail(f"read device values: {type(error).__name__}: {error} (recorded: {recorder.reads})")
    if recorder.reads:
        pytest.fail(f"device -> host reads on the hot path: {recorder.reads}")
    return result


def _empty(shape, device, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device=device)


# -- the harness can fail ----------------------------------------------------------------------------


@pytest.mark.parametrize("read", ["tolist", "item", "int", "bool", "equal", "cpu"])
def test_the_harness_sees_every_kind_of_read(read, device):
    reads = {
        "tolist": lambda t: t.tolist(),
        "item": lambda t: t[0].item(),
        "int": lambda t: int(t[0]),
        "bool": lambda t: bool(t[0]),
        "equal": lambda t: torch.equal(t, t),
        "cpu": lambda t: t.cpu(),
    }
    with pytest.raises(pytest.fail.Exception, match="read device values|device -> host reads"):
        run_without_reads(device, lambda d: (torch.zeros(3, dtype=torch.int32, device=d),), reads[read])


# -- varlen: every public function that takes cu_seqlens ---------------------------------------------


def _packed(device, total_q=7, total_k=9, batch=2):
    cu_q = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    cu_k = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    return (_empty((total_q, 4, 64), device), _empty((total_k, 2, 64), device), _empty((total_k, 2, 64), device),
            cu_q, cu_k)


VARLEN_CALLS = {
    "mfa_hf.flash_attn_varlen_func": lambda q, k, v, cu_q, cu_k: mfa_hf.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 5, 6, causal=True),
    "mfa_hf.flash_attn_varlen_func lse": lambda q, k, v, cu_q, cu_k: mfa_hf.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 5, 6, return_lse=True)[0],
    "flash_attn.flash_attn_varlen_func": lambda q, k, v, cu_q, cu_k: shim.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 5, 6, causal=True),
    "flash_attn.flash_attn_varlen_kvpacked_func": lambda q, k, v, cu_q, cu_k: shim.flash_attn_varlen_kvpacked_func(
        q, torch.stack([k, v], dim=1), cu_q, cu_k, 5, 6),
    "flash_attn.flash_attn_varlen_qkvpacked_func": lambda q, k, v, cu_q, cu_k: shim.flash_attn_varlen_qkvpacked_func(
        torch.stack([q.narrow(1, 0, 2), q.narrow(1, 2, 2), q.narrow(1, 0, 2)], dim=1), cu_q, 5),
    "transformers fa_surface varlen": lambda q, k, v, cu_q, cu_k: fa_surface.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 5, 6, causal=True, window_size=(3, 0)),
}


@pytest.mark.parametrize("name", list(VARLEN_CALLS))
def test_varlen_reads_nothing_back(device, name):
    out = run_without_reads(device, _packed, VARLEN_CALLS[name])
    assert out.device.type == device and out.shape[0] == 7


# -- kv cache: tensor cache_seqlens and cache_batch_idx ----------------------------------------------


def _cache(device, batch=2, rows=3, capacity=32, new=1):
    lengths = torch.zeros(batch, dtype=torch.int32, device=device)
    batch_idx = torch.zeros(batch, dtype=torch.int32, device=device)
    return (_empty((batch, 1, 8, 64), device), _empty((rows, capacity, 2, 64), device),
            _empty((rows, capacity, 2, 64), device), _empty((batch, new, 2, 64), device),
            _empty((batch, new, 2, 64), device), lengths, batch_idx)


KVCACHE_CALLS = {
    "append + decode": lambda q, kc, vc, k, v, n, rows: mfa_hf.flash_attn_with_kvcache(
        q, kc, vc, k, v, cache_seqlens=n, cache_batch_idx=rows),
    "decode only": lambda q, kc, vc, k, v, n, rows: mfa_hf.flash_attn_with_kvcache(
        q, kc, vc, cache_seqlens=n, cache_batch_idx=rows, return_lse=True)[0],
    "lengths only": lambda q, kc, vc, k, v, n, rows: mfa_hf.flash_attn_with_kvcache(
        q, kc.narrow(0, 0, 2), vc.narrow(0, 0, 2), k, v, cache_seqlens=n, window_size=(8, 0)),
    "flash_attn shim": lambda q, kc, vc, k, v, n, rows: shim.flash_attn_with_kvcache(
        q, kc, vc, k, v, cache_seqlens=n, cache_batch_idx=rows, causal=True),
}


@pytest.mark.parametrize("name", list(KVCACHE_CALLS))
def test_kvcache_reads_nothing_back(device, name):
    out = run_without_reads(device, _cache, KVCACHE_CALLS[name])
    assert out.device.type == device and out.shape == (2, 1, 8, 64)


def test_quantized_kvcache_reads_nothing_back(fake_device):
    device = fake_device
    def make(d):
        q, _, _, k, v, lengths, rows = _cache(d)
        caches = [mfa_hf.allocate_kv_cache(3, 32, 2, 64, "int8", dtype=torch.float16, device=d) for _ in range(2)]
        return q, *caches, k, v, lengths, rows

    out = run_without_reads(device, make, KVCACHE_CALLS["append + decode"])
    assert out.shape == (2, 1, 8, 64)


# -- transformers' packed (varlen) path --------------------------------------------------------------


class _Module(torch.nn.Module):
    is_causal = True
    layer_idx = 0

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"_attn_implementation": "mps_flash"})()


def test_transformers_packed_sequences_read_nothing_back(fake_device):
    device = fake_device
    """mps_flash with cu_seq_lens (DataCollatorWithFlattening, continuous batching): transformers' flash
    path hands the offsets and max lengths to our varlen surface, which must not read them back."""
    pytest.importorskip("transformers")
    from mfa_hf.integrations import transformers as integration
    from mfa_hf.integrations.transformers.attention import mps_flash_attention_forward

    assert integration.register().ok  # "mps_flash" in transformers' registries (importing mfa_hf defers it)

    def make(d):
        q = _empty((1, 4, 7, 64), d)
        kv = _empty((1, 2, 7, 64), d)
        return q, kv, _empty((1, 2, 7, 64), d), torch.zeros(3, dtype=torch.int32, device=d)

    def call(q, k, v, cu):
        out, _ = mps_flash_attention_forward(_Module().eval(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                             max_length_q=4, max_length_k=4)
        return out

    out = run_without_reads(device, make, call)
    assert out.shape == (1, 7, 4, 64)


# -- value checks still run: always on CPU, on devices with MFA_CHECK_VALUES=1 -------------------------


def _cpu_varlen(cu_q=(0, 3, 7), cu_k=(0, 4, 9), max_q=5, max_k=6):
    q, k, v = torch.randn(7, 4, 16), torch.randn(9, 2, 16), torch.randn(9, 2, 16)
    return mfa_hf.flash_attn_varlen_func(q, k, v, torch.tensor(cu_q, dtype=torch.int32),
                                         torch.tensor(cu_k, dtype=torch.int32), max_q, max_k)


@pytest.mark.parametrize("change, match", [
    (dict(cu_q=(1, 3, 7)), r"cu_seqlens_q: expected to start at 0, got 1"),
    (dict(cu_k=(0, 6, 5, 9)), r"cu_seqlens_q: expected 4 offsets|cu_seqlens_k: expected 3 offsets"),
    (dict(cu_k=(0, 6, 4)), r"cu_seqlens_k: expected non-decreasing offsets, got \[0, 6, 4\]"),
    (dict(cu_k=(0, 3, 8)), r"cu_seqlens_k: expected to end at the total length 9, got 8"),
    (dict(max_q=3), r"max_seqlen_q: expected at least the longest sequence \(4\), got 3"),
    (dict(max_k=4), r"max_seqlen_k: expected at least the longest sequence \(5\), got 4"),
], ids=["start", "count", "order", "end", "max_q", "max_k"])
def test_cpu_offsets_are_always_checked(change, match, monkeypatch):
    monkeypatch.delenv("MFA_CHECK_VALUES", raising=False)
    with pytest.raises(ValueError, match=match):
        _cpu_varlen(**change)


def _cpu_cache(lengths, rows, new=2):
    q = torch.randn(2, 1, 4, 16)
    caches = torch.zeros(3, 8, 2, 16), torch.zeros(3, 8, 2, 16)
    k = torch.randn(2, new, 2, 16) if new else None
    return lambda: mfa_hf.flash_attn_with_kvcache(
        q, *caches, k, None if k is None else k.clone(), cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
        cache_batch_idx=None if rows is None else torch.tensor(rows, dtype=torch.int32))


@pytest.mark.parametrize("call, match", [
    (_cpu_cache([0, 7], [0, 1]), r"cache_seqlens: expected lengths \+ 2 new tokens <= the cache capacity 8, "
                                 r"got \[0, 7\]"),
    (_cpu_cache([-1, 0], [0, 1]), r"cache_seqlens: expected lengths >= 0, got \[-1, 0\]"),
    (_cpu_cache([0, 0], [0, 3]), r"cache_batch_idx: expected rows in \[0, 3\), got \[0, 3\]"),
    (_cpu_cache([0, 0], [-1, 0], new=0), r"cache_batch_idx: expected rows in \[0, 3\), got \[-1, 0\]"),
    (_cpu_cache([0, 0], [2, 2]), r"cache_batch_idx: expected distinct rows when appending k/v, got \[2, 2\]"),
], ids=["past capacity", "negative", "row range", "negative row", "repeated rows"])
def test_cpu_cache_values_are_always_checked(call, match, monkeypatch):
    monkeypatch.delenv("MFA_CHECK_VALUES", raising=False)
    with pytest.raises(ValueError, match=match):
        call()


def test_check_values_switch_reads_device_values(device, monkeypatch):
    """MFA_CHECK_VALUES=1 turns the device checks back on: the (fake) call then reads the values."""
    monkeypatch.setenv("MFA_CHECK_VALUES", "1")
    with pytest.raises(pytest.fail.Exception, match="read device values"):
        run_without_reads(device, _packed, VARLEN_CALLS["mfa_hf.flash_attn_varlen_func"])
    with pytest.raises(pytest.fail.Exception, match="read device values"):
        run_without_reads(device, _cache, KVCACHE_CALLS["append + decode"])
    monkeypatch.setenv("MFA_CHECK_VALUES", "0")
    run_without_reads(device, _packed, VARLEN_CALLS["mfa_hf.flash_attn_varlen_func"])


# -- trusted values stay inside the tensors (the torch fallback, called as a device backend would be) --


def test_torch_backend_checks_the_offsets_it_reads():
    """The torch backend reads offsets on the host (its price) and checks them there, so device offsets
    the API trusted still give a clear error on the fallback, never a bad slice."""
    from mfa_hf.kernels.torch import backend

    q, k, v = torch.randn(7, 4, 16), torch.randn(9, 2, 16), torch.randn(9, 2, 16)
    good = torch.tensor([0, 3, 7], dtype=torch.int32)
    from mfa_hf.kernels.contract import AttentionCall

    def forward(cu_q, cu_k):
        return backend.forward(AttentionCall.from_op_args(
            (q, k, v, None, None, None, cu_q, cu_k, None, 0.25, -1, -1, 0.0, 0.0, 4, 5)))

    with pytest.raises(ValueError, match=r"cu_seqlens_k: expected to end at the total length 9, got 12"):
        forward(good, torch.tensor([0, 4, 12], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens_q: expected non-decreasing offsets, got \[0, 5, 3, 7\]"):
        forward(torch.tensor([0, 5, 3, 7], dtype=torch.int32), torch.tensor([0, 4, 6, 9], dtype=torch.int32))


@pytest.mark.parametrize("lengths, rows, match", [
    ([3, 9], None, r"cache_seqlens: expected lengths \(new tokens included\) in \[0, 8\].*got \[3, 9\]"),
    ([3, -2], None, r"cache_seqlens: expected lengths .*got \[3, -2\]"),
    ([3, 4], [0, 3], r"cache_batch_idx: expected rows in \[0, 3\), got \[0, 3\]"),
])
def test_torch_decode_checks_the_values_it_reads(lengths, rows, match):
    from mfa_hf.kernels.contract import DecodeCall
    from mfa_hf.kernels.torch.decode import decode

    q, cache = torch.randn(2, 1, 4, 16), torch.randn(3 if rows else 2, 8, 2, 16)
    with pytest.raises(ValueError, match=match):
        decode(DecodeCall.from_op_args((q, cache, None, cache, None, torch.tensor(lengths, dtype=torch.int32),
                                        None if rows is None else torch.tensor(rows, dtype=torch.int32), None, None,
                                        "none", "none", 16, 16, 0.25, -1, 0, 0.0, 0)))


def test_device_append_clamps_out_of_range_indices():
    """Off the CPU the torch append trusts its indices but clamps them into the cache: an out-of-range
    length or row overwrites a slot of the cache, never memory past it (mps index_put has no bounds check)."""
    cache = torch.zeros(3, 8, 2, 4)
    lengths, rows = torch.tensor([7, -5, 2], dtype=torch.int32), torch.tensor([9, 0, -1], dtype=torch.int32)
    clamped_rows, positions = kvcache._append_indices(cache, lengths, rows, 2, bounded=True)
    assert clamped_rows.tolist() == [2, 0, 0]
    assert positions.tolist() == [[7, 7], [0, 0], [2, 3]]
    as_given = kvcache._append_indices(cache, lengths, rows, 2, bounded=False)
    assert as_given[0].tolist() == [9, 0, -1] and as_given[1].tolist() == [[7, 8], [-5, -4], [2, 3]]


def test_meta_varlen_returns_shapes():
    q, k, v, cu_q, cu_k = _packed(torch.device("meta"))
    out, lse = mfa_hf.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, return_lse=True)
    assert out.is_meta and out.shape == (7, 4, 64) and lse.shape == (4, 7)


def test_fake_device_cases_in_a_fresh_python():
    """Every test of this file that needs the fake device, run in a child Python that may register it."""
    if IN_CHILD:
        pytest.skip("the child run itself")
    env = {**os.environ, "MFA_NO_HOST_READS_CHILD": "1"}
    here = Path(__file__)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here)],
                            cwd=here.parents[1], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and summary.count("skipped") <= 1, summary  # only this test skips there
