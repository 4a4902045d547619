"""Rules of Apple's compiler and of torch.mps.compile_shader that clang alone would not enforce,
checked on the project's kernels: define order and prefix, ASCII sources, a declared threadgroup
size, MSL 3.0 (no bfloat) on macOS 13 with torch 2.7/2.8, and what a user gets when a kernel fails
to compile or launch on their Mac (a warning and the torch backend, or an error when forced).
"""

import re
import warnings

import pytest
import torch

import mfa_hf
from mfa_hf import trace
from mfa_hf.kernel_fallback import KernelFallbackWarning, KernelUnavailable
from mfa_hf.kernels.metal import append, backend, backward, decode, forward, loader
from mfa_hf.kernels.metal.emulator import MetalCompileError
from mfa_hf.kernels.metal.emulator.targets import emulate
from mfa_hf.problem import AttentionProblem

SOURCES = sorted(p.name for p in loader.HERE.glob("*.metal"))
SHIPPED = sorted(p for pattern in ("*.metal", "*.h") for p in loader.HERE.glob(pattern))

# One variant of each kernel source, with its parameter count.
VARIANTS = [
    (forward.ForwardVariant(torch.float16, 64, 64, mask_kind="additive", mask_dtype=torch.float16, softcap=True,
                            alibi=True, sinks=True, varlen=True), len(forward.PARAM_FIELDS)),
    (backward.BackwardVariant(torch.float32, 96, 64, mask_kind="bool", alibi=True, grad_lse=True),
     len(backward.BACKWARD_PARAM_FIELDS)),
    (decode.DecodeVariant(torch.float16, 128, 128, "nf4", "int8", 4, sinks=True, batch_idx=True, split=True),
     len(decode.DECODE_PARAM_FIELDS)),
    (append.AppendVariant(torch.float32, "fp8_e4m3", 64, True, True), append.APPEND_PARAM_COUNT),
]
VARIANT_IDS = [type(v).__name__ for v, _ in VARIANTS]


def problem(**changes) -> AttentionProblem:
    fields = dict(device_type="cpu", dtype=torch.float16, batch=1, seqlen_q=16, seqlen_k=16, heads_q=2,
                  heads_kv=1, head_dim_qk=32, head_dim_v=32)
    fields.update(changes)
    return AttentionProblem(**fields)


# -- define order and prefix -------------------------------------------------------------------

@pytest.mark.parametrize("name", SOURCES)
def test_every_source_includes_metal_stdlib_first(name):
    """The first preprocessor line of each kernel source is `#include <metal_stdlib>`: the variant
    defines go right after it, and nothing before it may use them."""
    directives = [line.strip() for line in loader.kernel_source(name).splitlines() if line.strip().startswith("#")]
    assert directives[0] == "#include <metal_stdlib>", directives[:3]


@pytest.mark.parametrize("variant, count", VARIANTS, ids=VARIANT_IDS)
def test_variant_defines_come_after_apples_headers_with_a_prefix(variant, count):
    source = loader.variant_source(variant, count)
    lines = source.splitlines()
    include = lines.index("#include <metal_stdlib>")
    defines = [i for i, line in enumerate(lines) if line.startswith("#define MFA_")]
    assert defines and min(defines) == include + 1, (include, defines[:3])
    names = loader.variant_defines(variant, count)
    assert names and all(name.startswith("MFA_") for name in names), sorted(names)
    before = re.sub(r"//[^\n]*", "", "\n".join(lines[:include]))  # the header comment may name them
    for name in names:  # no variant macro is used (or defined) above the include
        assert not re.search(rf"\b{name}\b", before), name


@pytest.mark.parametrize("variant, count", VARIANTS, ids=VARIANT_IDS)
def test_defines_placed_first_are_rejected_like_apples_headers_would(variant, count, emulator):
    """How every variant was built before: defines prepended to the source. Apple's headers would be
    rewritten by them; the strict emulator refuses it, naming the macro."""
    source = loader.kernel_source(getattr(variant, "SOURCE"))
    prepended = "".join(f"#define {k} {int(v) if isinstance(v, bool) else v}\n"
                        for k, v in variant.defines(count).items()) + source
    with pytest.raises(MetalCompileError, match="before|metal_stdlib"):
        emulator.compile_shader(prepended)


# -- ASCII, threadgroup size ------------------------------------------------------------------

@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_sources_are_ascii(path):
    """torch compiles the source string as ASCII: one byte past 0x7F (a dash or arrow in a comment)
    fails the whole library on a Mac."""
    data = path.read_bytes()
    bad = [(data[:i].count(b"\n") + 1, byte) for i, byte in enumerate(data) if byte > 0x7F]
    assert not bad, f"{path.name}: non-ASCII bytes at lines {sorted({line for line, _ in bad})[:10]}"


def _kernels(source: str) -> list[tuple[str, str]]:
    """(attribute list, name) of every kernel function in a source."""
    return re.findall(r"\[\[(kernel[^\]]*)\]\]\s*void\s+(\w+)\s*\(", source)


@pytest.mark.parametrize("name", SOURCES)
def test_every_kernel_declares_its_threadgroup_size(name):
    source = loader.kernel_source(name)
    kernels = _kernels(source)
    assert kernels, f"{name}: no kernel found"
    assert len(kernels) == source.count(" void attention_") + source.count(" void kvcache_"), kernels
    for attributes, kernel in kernels:
        assert "max_total_threads_per_threadgroup(" in attributes, (name, kernel)


def test_a_launch_wider_than_the_pipeline_allows_is_refused(metal, monkeypatch):
    """The host checks each launch against the compiled pipeline's limit before dispatching."""
    monkeypatch.setattr(loader.CheckedKernel, "max_threads_per_threadgroup", property(lambda self: 64))
    monkeypatch.setenv("MFA_BACKEND", "metal")
    if metal.is_emulated:
        monkeypatch.setenv("MFA_METAL_EMULATOR", "1")
    q = torch.randn(1, 16, 2, 32).to(metal.device)
    with pytest.raises(KernelUnavailable, match="128 threads per threadgroup.*allows 64"):
        mfa_hf.flash_attn_func(q, q, q)


# -- MSL 3.0: macOS 13 with torch 2.7 / 2.8 ----------------------------------------------------

MACOS13 = dict(macos="13.6", torch="2.8.0")


def test_bfloat16_is_declined_where_msl_has_no_bfloat(monkeypatch):
    monkeypatch.setenv("MFA_METAL_EMULATOR", "1")
    with emulate(**MACOS13):
        ok, reason = backend.supports(problem(dtype=torch.bfloat16))
        assert not ok and "MSL 3.0" in reason and "bfloat" in reason, reason
        assert backend.supports(problem(dtype=torch.float16))[0]
        assert backend.supports(problem(dtype=torch.bfloat16, seqlen_q=1, kv_format="int8"))[0] is False
    with emulate(macos="14.5", torch="2.8.0"):
        assert backend.supports(problem(dtype=torch.bfloat16))[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("fmt", [None, "int8", "nf4"], ids=str)
def test_decode_and_append_compile_and_run_under_msl_3_0(dtype, fmt, emulator, monkeypatch):
    """Every decode and append variant failed on macOS 13 (dequant.h declared a bfloat overload
    unconditionally); fp16 and fp32 now build and match the torch backend there."""
    monkeypatch.setenv("MFA_METAL_EMULATOR", "1")
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 1, 4, 64, generator=g).to(dtype)
    content = torch.randn(2, 32, 2, 64, generator=g).to(dtype)
    new = torch.randn(2, 1, 2, 64, generator=g).to(dtype)
    lengths = torch.tensor([5, 17], dtype=torch.int32)
    results = {}
    for name in ("metal", "torch"):
        monkeypatch.setenv("MFA_BACKEND", name)
        cache = content.clone() if fmt is None else mfa_hf.quantize_kv(content, fmt)
        with emulate(**MACOS13), trace.capture() as calls:
            out = mfa_hf.flash_attn_with_kvcache(q, cache, cache, new, new, cache_seqlens=lengths, causal=True)
        assert trace.served_by(calls)[(name, "decode")] == 1
        results[name] = out
    torch.testing.assert_close(results["metal"], results["torch"], rtol=2e-3, atol=2e-3)


def test_the_unguarded_bfloat_overload_fails_under_msl_3_0(emulator):
    """The defect itself, planted back: Apple's MSL 3.0 has no `bfloat`, nor does the emulator's."""
    guarded = loader.kernel_source("dequant.h")
    assert "#if __METAL_VERSION__ >= 310" in guarded
    with emulate(**MACOS13):
        emulator.compile_shader(guarded)
        with pytest.raises(MetalCompileError, match="bfloat"):
            emulator.compile_shader(guarded.replace("#if __METAL_VERSION__ >= 310", "#if 1"))


# -- a kernel that fails on the user's Mac -----------------------------------------------------

BROKEN = "\n#error planted compile error\n"


@pytest.fixture
def broken_forward(metal, monkeypatch):
    """The forward source with a compile error planted, on a fresh library cache, auto dispatch."""
    original = loader.kernel_source
    monkeypatch.setattr(loader, "kernel_source",
                        lambda name: original(name) + (BROKEN if name == "attention_forward.metal" else ""))
    monkeypatch.setattr(loader, "_libraries", {})
    monkeypatch.setattr("mfa_hf.kernel_fallback._warned", set())
    monkeypatch.delenv("MFA_BACKEND", raising=False)
    if metal.is_emulated:
        monkeypatch.setenv("MFA_METAL_EMULATOR", "1")
    return metal


def test_a_compile_failure_falls_back_to_torch_with_one_warning(broken_forward, no_native_routes):
    device = broken_forward.device
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 20, 2, 32, generator=g).to(device).requires_grad_(True) for _ in range(3))
    with pytest.warns(KernelFallbackWarning) as caught, trace.capture() as calls, trace.capture_fallbacks() as fell:
        out = mfa_hf.flash_attn_func(q, k, v, causal=True)
        out.sum().backward()
    messages = [str(w.message) for w in caught if issubclass(w.category, KernelFallbackWarning)]
    assert len(messages) == 1, messages
    message = messages[0]
    assert "attention_forward.metal" in message and "float32" in message and torch.__version__ in message
    assert "planted compile error" in message and "MFA_BACKEND=metal" in message
    served = trace.served_by(calls)
    assert served[("torch", "fwd")] == 1 and served[("metal", "fwd")] == 0, dict(served)
    assert served[("metal", "bwd")] == 1, dict(served)  # the backward kernels still build
    ((source, reason), count), = fell.items()
    assert source == "metal -> torch" and "failed to compile" in reason and count == 1
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(t.detach().cpu().transpose(1, 2).double() for t in (q, k, v)), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out.detach().cpu().double(), expected, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)  # once per variant: the second call is quiet
        mfa_hf.flash_attn_func(q, k, v, causal=True)


def test_a_forced_metal_backend_raises_the_compile_failure(broken_forward, monkeypatch):
    monkeypatch.setenv("MFA_BACKEND", "metal")
    q = torch.randn(1, 8, 2, 32).to(broken_forward.device)
    with pytest.raises(KernelUnavailable, match="(?s)attention_forward.metal.*failed to compile.*planted compile error"):
        mfa_hf.flash_attn_func(q, q, q)


def test_a_launch_failure_falls_back_for_decode_and_append(metal, monkeypatch):
    """A launch the pipeline refuses: decode goes to the torch backend, append to the generic write."""
    monkeypatch.setattr(loader.CheckedKernel, "max_threads_per_threadgroup", property(lambda self: 16))
    monkeypatch.setattr("mfa_hf.kernel_fallback._warned", set())
    monkeypatch.delenv("MFA_BACKEND", raising=False)
    if metal.is_emulated:
        monkeypatch.setenv("MFA_METAL_EMULATOR", "1")
    q = torch.randn(2, 1, 2, 32).to(metal.device)
    cache = mfa_hf.quantize_kv(torch.randn(2, 16, 1, 32), "int8")
    cache = mfa_hf.QuantizedKV(cache.codes.to(metal.device), cache.scales.to(metal.device), cache.format,
                               cache.group_size, cache.dtype)
    new = torch.randn(2, 1, 1, 32).to(metal.device)
    lengths = torch.tensor([3, 9], dtype=torch.int32).to(metal.device)
    with pytest.warns(KernelFallbackWarning), trace.capture() as calls, trace.capture_fallbacks() as fell:
        mfa_hf.flash_attn_with_kvcache(q, cache, cache, new, new, cache_seqlens=lengths)
    served = trace.served_by(calls)
    assert served[("torch", "decode")] == 1 and served[("generic", "append")] == 2, dict(served)
    assert {source for source, _ in fell} == {"metal -> torch", "metal -> generic"}


# -- empty problems --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 8, 2, 32), (2, 0, 2, 32)], ids=["batch0", "len0"])  # 0 heads: a ValueError
def test_empty_problems_launch_no_zero_grid(shape, metal_backend):
    """Metal leaves a grid with a 0 dimension undefined (the strict emulator refuses one): forward,
    backward, decode and append answer empty problems on the host."""
    device = metal_backend.device
    q = torch.randn(shape).to(device).requires_grad_(True)
    out = mfa_hf.flash_attn_func(q, q, q, causal=True)
    out.sum().backward()
    assert out.shape == shape and q.grad.shape == shape
    batch, length, heads, dim = shape
    cache = torch.zeros(batch, 16, heads, dim).to(device)
    lengths = torch.zeros(batch, dtype=torch.int32).to(device)
    new = torch.randn(batch, length, heads, dim).to(device)
    out = mfa_hf.flash_attn_with_kvcache(new, cache, cache, new, new, cache_seqlens=lengths)
    assert out.shape == shape
