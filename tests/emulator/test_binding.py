"""torch.mps.compile_shader's argument binding and launch geometry, as the emulator mirrors it."""

import pytest
import torch

from mfa_hf.kernels.metal.emulator import EmulatorWarning

SRC = r"""
#include <metal_stdlib>
using namespace metal;
kernel void put_long(device long* out, constant long& v, uint i [[thread_position_in_grid]]) { out[i] = v; }
kernel void put_uint(device uint* out, constant uint& v, uint i [[thread_position_in_grid]]) { out[i] = v; }
kernel void put_float(device float* out, constant float& v, uint i [[thread_position_in_grid]]) { out[i] = v; }
kernel void put_half(device half* out, constant half& v, uint i [[thread_position_in_grid]]) { out[i] = v; }
kernel void index_of(device uint* out, uint i [[thread_position_in_grid]]) { out[i] = i + 1; }
kernel void sum_list(device float* out, constant float* xs [[buffer(1)]], constant int64_t* ns [[buffer(2)]],
                     uint i [[thread_position_in_grid]]) { out[i] = xs[0] + xs[1] + float(ns[0] + ns[1]); }
kernel void ids(device uint* out, uint3 gid [[thread_position_in_grid]], uint3 tg [[threadgroup_position_in_grid]],
                uint3 tpt [[thread_position_in_threadgroup]], uint3 size [[threads_per_threadgroup]],
                uint3 groups [[threadgroups_per_grid]], uint tidx [[thread_index_in_threadgroup]],
                uint3 grid [[threads_per_grid]]) {
  uint at = (gid.z * grid.y + gid.y) * grid.x + gid.x;
  device uint* o = out + at * 8;
  o[0] = gid.x; o[1] = gid.y; o[2] = gid.z; o[3] = tg.x; o[4] = tpt.x; o[5] = size.x; o[6] = groups.x; o[7] = tidx;
}
"""


@pytest.fixture(scope="module")
def lib(metal):
    return metal.compile_shader(SRC)


def test_python_int_is_int64(lib, metal):
    out = torch.zeros(4, dtype=torch.int64, device=metal.device)
    lib.put_long(out, 2**40 + 3)
    assert out.cpu().tolist() == [2**40 + 3] * 4


def test_python_float_is_float32(lib, metal):
    out = torch.zeros(3, device=metal.device)
    lib.put_float(out, 0.1)
    assert out.cpu().tolist() == [torch.tensor(0.1, dtype=torch.float32).item()] * 3


def test_int_read_as_32_bit_warns_and_reads_low_half(lib, emulator):
    out = torch.zeros(2, dtype=torch.int32)
    with pytest.warns(EmulatorWarning, match=r"argument 1 .*int64.*constant uint& v.*arg_casts=\{1: 'int32'\}"):
        lib.put_uint(out, 2**32 + 7)
    assert out.tolist() == [7, 7]  # little-endian low half, as Metal reads it


def test_arg_casts_fix_the_width_without_warning(lib, metal, recwarn):
    out = torch.zeros(2, dtype=torch.int32, device=metal.device)
    lib.put_uint(out, 123456, arg_casts={1: "int32"})
    lib.put_half(torch.zeros(2, dtype=torch.float16, device=metal.device), 1.5, arg_casts="fp16")
    assert out.cpu().tolist() == [123456, 123456]
    assert not [w for w in recwarn if issubclass(w.category, EmulatorWarning)]


def test_tensor_binds_at_storage_offset_and_strides_are_ignored(lib, metal):
    base = torch.zeros(12, dtype=torch.int32, device=metal.device)
    lib.index_of(base[4:], threads=3)
    strided = base.view(6, 2)[:, 0]  # stride 2: Metal ignores it and writes contiguously
    lib.index_of(strided, threads=2)
    assert base.cpu().tolist() == [1, 2, 0, 0, 1, 2, 3, 0, 0, 0, 0, 0]


def test_lists_become_arrays(lib, metal):
    out = torch.zeros(1, device=metal.device)
    lib.sum_list(out, [0.5, 0.25], [3, 4])
    assert out.cpu().tolist() == [7.75]


def test_threads_default_to_numel_of_first_tensor(lib, metal):
    out = torch.zeros(37, dtype=torch.int32, device=metal.device)
    lib.index_of(out)
    assert out.cpu().tolist() == list(range(1, 38))


def test_partial_edge_threadgroup_ids(lib, emulator):
    out = torch.full((10 * 8,), 99, dtype=torch.int32)
    lib.ids(out, threads=10, group_size=4)
    rows = out.view(10, 8).tolist()
    assert [r[3] for r in rows] == [0] * 4 + [1] * 4 + [2] * 2  # threadgroup x
    assert [r[4] for r in rows] == [0, 1, 2, 3] * 2 + [0, 1]  # position in threadgroup
    assert [r[5] for r in rows] == [4] * 8 + [2] * 2  # threads_per_threadgroup: partial at the edge
    assert {r[6] for r in rows} == {3}


def test_three_dimensional_grid(lib, metal):
    out = torch.zeros(3 * 2 * 2 * 8, dtype=torch.int32, device=metal.device)
    lib.ids(out, threads=(3, 2, 2), group_size=(2, 1, 2))
    rows = out.cpu().view(2, 2, 3, 8)
    assert rows[..., 0].tolist() == [[[0, 1, 2]] * 2] * 2
    assert rows[..., 1].tolist() == [[[0, 0, 0], [1, 1, 1]]] * 2
    assert rows[..., 2].tolist() == [[[0] * 3] * 2, [[1] * 3] * 2]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda lib: lib.put_float(torch.zeros(2)), ValueError, r"put_float: expected at least 2 argument\(s\)"),
        (lambda lib: lib.put_float(torch.zeros(2), "x"), RuntimeError, r"argument 1: expected a tensor, int, float or list, got str"),
        (lambda lib: lib.put_float(torch.zeros(2, device="meta"), 1.0), ValueError, r"argument 0: the emulator runs on CPU tensors"),
        (lambda lib: lib.put_float(torch.zeros(2), 1.0, threads=(2, 2), group_size=2), ValueError, r"group_size: expected 2 dimension"),
        (lambda lib: lib.put_float(torch.zeros(2), 1.0, threads=2048, group_size=2048), ValueError, r"at most 1024 threads"),
        (lambda lib: lib.put_float(torch.zeros(2), 1.0, threads=0), ValueError, r"threads: 0 contains 0"),
        (lambda lib: lib.put_float(torch.zeros(2), 1.0, threads=-1), ValueError, r"threads: expected a positive int"),
        (lambda lib: lib.put_float(torch.zeros(2), 1.0, arg_casts={5: "int32"}), ValueError, r"arg_casts: expected argument indices"),
        (lambda lib: lib.put_float(torch.zeros(2), 1.0, arg_casts={1: "int3"}), RuntimeError, r"arg_casts\[1\]: expected one of"),
        (lambda lib: lib.no_such_kernel, AttributeError, r"no kernel named 'no_such_kernel'.*put_float"),
    ],
)
def test_bad_calls_name_the_argument(lib, emulator, call, error, match):
    with pytest.raises(error, match=match):
        call(lib)
