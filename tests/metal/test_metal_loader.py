"""The metal backend's loader, launch contract and dispatch answers."""

import pytest
import torch

import mfa_hf
from mfa_hf.kernels.metal import backend, forward, loader
from mfa_hf.kernels.metal.emulator import with_defines
from mfa_hf.problem import AttentionProblem
from mfa_hf.testing import Case, make_inputs, run_public_api


def problem(**changes) -> AttentionProblem:
    fields = dict(device_type="cpu", dtype=torch.float16, batch=1, seqlen_q=64, seqlen_k=64, heads_q=4,
                  heads_kv=2, head_dim_qk=64, head_dim_v=64)
    fields.update(changes)
    return AttentionProblem(**fields)


def test_supports_reports_honest_reasons(monkeypatch):
    monkeypatch.setenv("MFA_METAL_EMULATOR", "1")
    assert backend.supports(problem()) == (True, backend.supports(problem())[1])
    refusals = {
        "dropout": problem(dropout_p=0.1),
        "float64": problem(dtype=torch.float64),
        "256": problem(head_dim_qk=320),
        "device cuda": problem(device_type="cuda"),
    }
    for expected, refused in refusals.items():
        ok, reason = backend.supports(refused)
        assert not ok and expected in reason, (expected, reason)
    for fmt in ("int8", "fp8_e4m3+nf4"):
        ok, reason = backend.supports(problem(seqlen_q=1, kv_format=fmt))
        assert ok and fmt in reason and "in-kernel" in reason, reason
    monkeypatch.delenv("MFA_METAL_EMULATOR")
    ok, reason = backend.supports(problem())
    assert not ok and "MFA_METAL_EMULATOR=1" in reason


def test_every_head_dim_fits_threadgroup_memory():
    for dtype in loader.MSL_TYPES:
        size = torch.tensor([], dtype=dtype).element_size()
        for dim in range(8, 257, 8):
            for dim_v in (8, dim, 256):
                config = loader.block_config(dtype, dim, dim_v)
                assert loader.threadgroup_bytes(config, size) <= loader.THREADGROUP_MEMORY_LIMIT, (dtype, dim, dim_v)


def test_library_cache_is_not_keyed_by_sequence_length(metal_backend, monkeypatch):
    # A fresh cache: the process-wide one also holds the other math mode's libraries (keyed by runtime).
    monkeypatch.setattr(loader, "_libraries", {})
    for lq, lk in ((5, 9), (70, 33), (31, 130)):
        case = Case(dtype=torch.float16, batch=1, lq=lq, lk=lk, heads_q=2, heads_kv=2, dim=48, dim_v=48)
        run_public_api(case, make_inputs(case, device=metal_backend.device))
    variants = [v for v in loader.cached_variants() if isinstance(v, forward.ForwardVariant) and v.dtype == torch.float16 and v.dim_qk == 48 and v.mask_kind == "none"
                and not (v.softcap or v.alibi or v.sinks or v.varlen)]
    assert len(variants) == 1, variants


def test_params_size_is_checked_by_the_kernel(metal_backend):
    """A host that announces a different field count fails to compile (static_assert)."""
    variant = forward.ForwardVariant(torch.float32, 32, 32)
    source = loader.kernel_source("attention_forward.metal")
    compile_shader = metal_backend.compile_shader
    compile_shader(with_defines(source, loader.variant_defines(variant, len(forward.PARAM_FIELDS))))
    with pytest.raises(Exception, match="AttentionParams|static_assert|static assertion"):
        compile_shader(with_defines(source, loader.variant_defines(variant, len(forward.PARAM_FIELDS) - 1)))


def test_header_field_names_match_the_host():
    assert loader.header_fields("attention_params.h", "AttentionParams") == forward.PARAM_FIELDS


def test_two_schedules_catch_a_missing_barrier(metal_backend, two_schedules, monkeypatch):
    """Our kernel without its end-of-block barrier races (the next block's staging overwrites K/V
    that another simdgroup still reads): the two-schedule check must notice."""
    if not metal_backend.is_emulated:
        pytest.skip("schedules exist only in the emulator")
    barrier = "threadgroup_barrier(mem_flags::mem_threadgroup);  // the next block overwrites"
    source = loader.kernel_source("attention_forward.metal")
    assert barrier in source
    broken = source.replace(barrier, "//")
    monkeypatch.setattr(loader, "kernel_source", lambda name: broken)
    monkeypatch.setattr(loader, "_libraries", {})
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, 32, generator=g).to(metal_backend.device) for n in (64, 96, 96))
    with pytest.raises(AssertionError, match="differs between schedules"):
        two_schedules(lambda: mfa_hf.flash_attn_func(q, k, v, return_lse=True))


def test_opcheck_and_compile(metal_backend):
    """The metal op passes torch.library.opcheck (schema, fake, autograd registration) and runs
    inside torch.compile(fullgraph=True)."""
    case = Case(dtype=torch.float32, batch=1, lq=9, lk=12, heads_q=2, heads_kv=1, dim=16, dim_v=8, causal=True)
    inputs = make_inputs(case, device=metal_backend.device, requires_grad=True)
    args = (inputs["q"], inputs["k"], inputs["v"], None, None, None, None, None, None, 0.25, -1, 0, 0.0, 0.0, 0, 0)
    torch.library.opcheck(mfa_hf.dispatch.backend("metal").ops.forward.op, args)
    compiled = torch.compile(lambda q, k, v: mfa_hf.flash_attn_func(q, k, v, causal=True), fullgraph=True,
                             backend="aot_eager")
    out = compiled(inputs["q"], inputs["k"], inputs["v"])
    expected = mfa_hf.flash_attn_func(inputs["q"], inputs["k"], inputs["v"], causal=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
