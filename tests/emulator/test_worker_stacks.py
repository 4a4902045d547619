"""Each compiled library links its own copy of the runtime, whose worker fibers keep their stacks
for the next launch. Hundreds of loaded variants used to exhaust the process's memory mappings
(vm.max_map_count: the full tests/metal run aborted in mmap). The library that launched last now
drops its workers when another library launches."""

import torch

SOURCE = """
#include <metal_stdlib>
using namespace metal;
kernel void fill(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) { out[i] = VALUE; }
"""


def _mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


def test_loaded_libraries_do_not_keep_their_worker_stacks(emulator):
    libraries = [emulator.compile_shader(SOURCE.replace("VALUE", f"{n}.0f")) for n in range(12)]
    out = torch.zeros(1024)
    libraries[0].fill(out, threads=1024, group_size=1024)  # the first launch may map its workers
    before = _mappings()
    for n, lib in enumerate(libraries):
        lib.fill(out, threads=1024, group_size=1024)
        assert bool((out == n).all())
    # Kept stacks cost 2 mappings per thread: 12 libraries x 1024 threads would add about 24,000.
    assert _mappings() - before < 4000, _mappings() - before
