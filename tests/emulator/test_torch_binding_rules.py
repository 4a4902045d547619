"""torch's binding rules (torch/csrc/mps/Module.cpp: _mps_MetalKernel.__call__, OptionalArgCaster;
OperationUtils.mm: MetalKernelFunction::setArg/dispatch), mirrored with torch's exception types."""

import pytest
import torch

from mfa_hf.kernels.metal.emulator import EmulatorWarning, KernelSourceError

SRC = r"""
#include <metal_stdlib>
using namespace metal;
kernel void gap(device float* out [[buffer(0)]], constant float& v [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  out[i] = v;
}
kernel void sum_list(device float* out, constant float* xs, uint i [[thread_position_in_grid]]) { out[i] = xs[0] + xs[1]; }
kernel void sum_ints(device long* out, constant long* xs, uint i [[thread_position_in_grid]]) { out[i] = xs[0] + xs[1]; }
"""


@pytest.fixture(scope="module")
def lib(emulator):
    return emulator.compile_shader(SRC)


def test_buffer_index_gap_binds_python_argument_i_to_buffer_i(lib, recwarn):
    out = torch.zeros(3)
    lib.gap(out, torch.zeros(1), 2.5)  # argument 1 fills the unused index 1, as on a Mac
    assert out.tolist() == [2.5] * 3
    assert not [w for w in recwarn if issubclass(w.category, EmulatorWarning)]


def test_too_few_arguments_for_a_gap_leave_a_buffer_unbound(lib):
    with pytest.raises(ValueError, match=r"gap: expected at least 3 argument\(s\).*buffer\(s\) \[2\] would be unbound"):
        lib.gap(torch.zeros(3), 2.5)


def test_arguments_past_the_last_buffer_warn(lib):
    out = torch.zeros(2)
    with pytest.warns(EmulatorWarning, match=r"argument\(s\) \[3\] bind buffer indices the kernel does not declare"):
        lib.gap(out, 0, 1.5, 7)
    assert out.tolist() == [1.5, 1.5]


def test_several_attributes_in_one_list_are_read(emulator):
    """`[[buffer(1), function_constant(x)]]` used to be read as no attribute at all (and bound in
    order); now both are seen, and function constants, which compile_shader cannot set, are refused."""
    src = SRC.replace("constant float& v [[buffer(2)]]", "constant float& v [[ buffer(2), function_constant(has_v) ]]")
    with pytest.raises(KernelSourceError, match=r"function constants are not supported.*#define"):
        emulator.compile_shader(src)


def test_list_types_follow_the_first_element(lib):
    out = torch.zeros(1)
    lib.sum_list(out, [0.5, 2])  # first element float: ints convert
    assert out.tolist() == [2.5]
    longs = torch.zeros(1, dtype=torch.int64)
    lib.sum_ints(longs, [True, 4])  # bool is an int
    assert longs.tolist() == [5]


@pytest.mark.parametrize("value, match", [
    ([], r"Empty list/tuple can not be an argument to metal kernel"),
    ((), r"Empty list/tuple can not be an argument to metal kernel"),
    ([1, 2.5], r"mixed list \[1, 2.5\]: its first element makes it a list of ints"),
    ([torch.zeros(1), 1], r"mixed list .* list of tensors"),
    (["a", "b"], r"a list of str"),
    (None, r"got NoneType"),
])
def test_bad_lists_and_arguments_raise_runtime_error_like_torch(lib, value, match):
    with pytest.raises(RuntimeError, match=match):
        lib.sum_list(torch.zeros(1), value)


@pytest.mark.parametrize("casts", ["float32", torch.float16, {1: "half"}])
def test_only_torchs_cast_names(lib, casts):
    with pytest.raises(RuntimeError, match=r"arg_casts"):
        lib.gap(torch.zeros(1), 0, 1.0, arg_casts=casts)


@pytest.mark.parametrize("threads", [0, (4, 0), (2, 2, 0)])
def test_zero_size_grid_is_an_error(lib, threads):
    with pytest.raises(ValueError, match=r"contains 0: .*undefined; answer empty problems on the host"):
        lib.gap(torch.zeros(4), 0, 1.0, threads=threads)


def test_empty_first_tensor_gives_a_zero_grid(lib):
    with pytest.raises(ValueError, match=r"threads: 0 contains 0"):
        lib.gap(torch.zeros(0), 0, 1.0)
