"""Rules Apple's compiler enforces and clang-as-C++ does not: each planted violation must fail here
with a message that says what and where, and the compliant twin must compile."""

import subprocess

import pytest
import torch

from mfa_hf.kernels.metal.emulator import MetalCompileError, compiler

HEAD = "#include <metal_stdlib>\nusing namespace metal;\n"
KERNEL = "kernel void k(device float* out, uint i [[thread_position_in_grid]]) { out[i] = BODY; }\n"


def kernel(body: str = "1.0f", before: str = "", after: str = "") -> str:
    return before + HEAD + after + KERNEL.replace("BODY", body)


# --- 1. macros before #include <metal_stdlib> --------------------------------------------------

@pytest.mark.parametrize("define, name", [("#define R 4", "R"), ("#define BK 32", "BK"), ("#define SQ(x) ((x) * (x))", "SQ"),
                                          ("#define USE_FAST", "USE_FAST")])
def test_macro_defined_before_the_include_is_an_error(emulator, define, name):
    with pytest.raises(MetalCompileError, match=rf"(?s)before #include <metal_stdlib>.*\b{name} \(MSL line 2\): "
                                                rf"{__import__('re').escape(define)}.*Define macros after the include"):
        emulator.compile_shader(kernel(before="// variant\n" + define + "\n"))


def test_macro_defined_in_a_header_before_metal_stdlib_is_an_error(emulator):
    """torch's c10/metal headers include <metal_stdlib> first; a project header that defines
    before including it is caught wherever the define sits."""
    src = "#define FMT 3\n#include <metal_simdgroup>\n" + HEAD + KERNEL.replace("BODY", "float(FMT)")
    with pytest.raises(MetalCompileError, match=r"FMT \(MSL line 1\)"):
        emulator.compile_shader(src)


@pytest.mark.parametrize("before", [
    "#ifndef MY_KERNEL_H\n#define MY_KERNEL_H\n",  # an include guard (closed below)
    "#define TMP 1\n#undef TMP\n",  # undefined again before the include: nothing reaches Apple's headers
])
def test_guards_and_undefined_macros_are_allowed(emulator, before):
    src = kernel(before=before) + ("#endif\n" if "ifndef" in before else "")
    out = torch.zeros(3)
    emulator.compile_shader(src).k(out)
    assert out.tolist() == [1.0] * 3


def test_macros_after_the_include_work(emulator):
    out = torch.zeros(2)
    emulator.compile_shader(kernel("float(MFA_R)", after="#define MFA_R 4\n")).k(out)
    assert out.tolist() == [4.0, 4.0]


def test_source_without_metal_stdlib_has_builtin_types_but_no_library(emulator):
    """As on a Mac: types and address spaces are built in, metal:: functions come with the include."""
    plain = "kernel void k(device float* out, uint i [[thread_position_in_grid]]) { out[i] = float(i) + 0.5f; }\n"
    out = torch.zeros(3)
    emulator.compile_shader(plain).k(out)
    assert out.tolist() == [0.5, 1.5, 2.5]
    with pytest.raises(MetalCompileError, match=r"sqrt"):
        emulator.compile_shader(plain.replace("float(i) + 0.5f", "metal::sqrt(float(i))"))


def test_shim_uses_all_caps_template_names_so_an_early_macro_breaks_it(emulator, tmp_path):
    """What the check above protects against, shown on the shim itself (as on Apple's headers)."""
    cmd, _ = compiler.find_compiler()

    def syntax_ok(text: str) -> bool:
        (tmp_path / "t.cpp").write_text(text)
        args = [*cmd, *compiler._CXX_FLAGS, "-fsyntax-only", "-w", "-I", str(compiler.INCLUDE_DIR), "-include",
                str(compiler._PRELUDE), "-D__HAVE_BFLOAT__=1", str(tmp_path / "t.cpp")]
        return subprocess.run(args, capture_output=True).returncode == 0

    assert syntax_ok("#define MFA_R 4\n#include <metal_stdlib>\n")
    assert not syntax_ok("#define R 4\n#include <metal_stdlib>\n")
    assert not syntax_ok("#define T float\n#include <metal_stdlib>\n")


# --- 4. double, recursion, implicit bfloat conversion, non-ASCII --------------------------------

def test_double_is_an_error_with_its_line(emulator):
    with pytest.raises(MetalCompileError, match=r"MSL line 3: `double` is not a Metal type"):
        emulator.compile_shader(kernel("float(double(i) * 0.5)"))


def test_double_through_a_macro_is_caught_where_it_is_used(emulator):
    src = kernel("float(REAL(i))", after="#define REAL double\n")
    with pytest.raises(MetalCompileError, match=r"MSL line 4: `double`"):
        emulator.compile_shader(src)


def test_the_word_double_in_comments_and_strings_is_fine(emulator):
    emulator.compile_shader(kernel("1.0f", after='// double-buffered\nconstant char NAME[] = "double";\n'))


@pytest.mark.parametrize("helpers, call, cycle", [
    ("int fact(int n) { return n <= 1 ? 1 : n * fact(n - 1); }\n", "float(fact(int(i)))", r"fact\(int\) -> fact\(int\)"),
    ("bool is_odd(uint n);\nbool is_even(uint n) { return n == 0 ? true : is_odd(n - 1); }\n"
     "bool is_odd(uint n) { return n == 0 ? false : is_even(n - 1); }\n", "float(is_even(i))",
     r"is_\w+\(unsigned int\) -> is_\w+\(unsigned int\) -> is_\w+\(unsigned int\)"),
])
def test_recursion_is_an_error(emulator, helpers, call, cycle):
    with pytest.raises(MetalCompileError, match=rf"recursion: {cycle}.*does not allow recursive calls"):
        emulator.compile_shader(kernel(call, after=helpers))


def test_overloads_and_template_chains_are_not_recursion(emulator):
    helpers = ("float f(float x) { return x * 2.0f; }\nfloat f(float2 v) { return f(v.x) + f(v.y); }\n"
               "template <int N> int total() { return N + total<N - 1>(); }\ntemplate <> int total<0>() { return 0; }\n")
    out = torch.zeros(2)
    emulator.compile_shader(kernel("f(float2(1.0f, 2.0f)) + float(total<3>())", after=helpers)).k(out)
    assert out.tolist() == [12.0, 12.0]


BF16 = """#include <metal_stdlib>
using namespace metal;
kernel void k(device const float* x, device bfloat* out, device half* h, uint i [[thread_position_in_grid]]) {
  STORE
  h[i] = x[i] * 2.0f;  // float -> half: implicit, allowed in MSL
}
"""


def test_implicit_float_to_bfloat_is_an_error(emulator):
    with pytest.raises(MetalCompileError, match=r"(?s)explicit conversion.*MSL line 4, column \d+: .*'float' to 'bfloat'"):
        emulator.compile_shader(BF16.replace("STORE", "out[i] = x[i] * 2.0f;"))


def test_explicit_bfloat_conversion_and_implicit_half_are_fine(emulator):
    x = torch.tensor([1.5, -2.0])
    out, h = torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.float16)
    emulator.compile_shader(BF16.replace("STORE", "out[i] = bfloat(x[i] * 2.0f);")).k(x, out, h)
    assert out.tolist() == [3.0, -4.0] and h.tolist() == [3.0, -4.0]


@pytest.mark.parametrize("text, where", [("// caf\u00e9\n", r"MSL line 3, column 7: non-ASCII character '\u00e9'"),
                                         ("constant float X = 1.0f; /* \u00d7 */\n", r"MSL line 3, column 29")])
def test_non_ascii_is_an_error_with_line_and_column(emulator, text, where):
    with pytest.raises(MetalCompileError, match=rf"{where}.*ASCII"):
        emulator.compile_shader(kernel(after=text))
