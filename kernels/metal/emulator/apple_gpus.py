"""Published figures about Apple GPUs that the cost model needs, each with its source.

Occupancy inputs per GPU family and peak FP32 FLOPs and memory bandwidth per chip. Where no
first-party figure exists the entry says so (`note`) and gives the estimate used.
"""

from __future__ import annotations

from dataclasses import dataclass

FEATURE_SET_TABLES = "https://developer.apple.com/metal/Metal-Feature-Set-Tables.pdf"
METAL_BENCHMARKS = "https://github.com/philipturner/metal-benchmarks (README, commit dc2adc6, 'On-Chip Memory', 'ALU Layout')"
MLX_SDPA = ("https://github.com/ml-explore/mlx/blob/main/mlx/backend/metal/scaled_dot_product_attention.cpp "
            "(commit 00703ea)")


@dataclass(frozen=True)
class Fact:
    value: float
    source: str
    note: str = ""


@dataclass(frozen=True)
class GpuFamily:
    name: str
    chips: str
    threadgroup_memory_per_core: Fact  # bytes
    max_threadgroup_memory: Fact  # bytes, per threadgroup
    max_threads_per_core: Fact  # resident threads at low register use
    max_threads_per_threadgroup: Fact
    schedulers_per_core: Fact


_APPLE_7_8 = dict(
    threadgroup_memory_per_core=Fact(60 * 1024, METAL_BENCHMARKS, "'~60 KB' shared memory per core, Apple 7 and 8"),
    max_threadgroup_memory=Fact(32 * 1024, FEATURE_SET_TABLES, "maximum total threadgroup memory allocation"),
    max_threads_per_core=Fact(3072, METAL_BENCHMARKS, "'384-3072' max threads per core (fewer with more registers)"),
    max_threads_per_threadgroup=Fact(1024, FEATURE_SET_TABLES, "maximum threads per threadgroup"),
    schedulers_per_core=Fact(4, METAL_BENCHMARKS, "'four schedulers, each dispatching one instruction from one simd'"),
)
_APPLE_9_ASSUMED = "not published for Apple 9 (M3/M4 Dynamic Caching allocates on-chip memory at run time); Apple 7/8's figure assumed"

FAMILIES = (
    GpuFamily("Apple7", "M1", **_APPLE_7_8),
    GpuFamily("Apple8", "M2", **_APPLE_7_8),
    GpuFamily("Apple9", "M3, M4", **{
        **_APPLE_7_8,
        "threadgroup_memory_per_core": Fact(60 * 1024, METAL_BENCHMARKS, _APPLE_9_ASSUMED),
        "max_threads_per_core": Fact(3072, METAL_BENCHMARKS, _APPLE_9_ASSUMED),
        "schedulers_per_core": Fact(4, METAL_BENCHMARKS, _APPLE_9_ASSUMED),
    }),
)


@dataclass(frozen=True)
class Chip:
    name: str
    family: str
    gpu_cores: int
    peak_fp32_tflops: Fact  # FP16 runs at the same rate on these GPUs (metal-benchmarks: GOPS16 = GOPS32)
    memory_gb_per_s: Fact


CHIPS = (
    Chip("M1", "Apple7", 8,
         Fact(2.617, METAL_BENCHMARKS, "GOPS32 2617 (8 cores, 1.278 GHz)"),
         Fact(68.25, "https://www.apple.com/newsroom/2020/11/apple-unleashes-m1/",
              "LPDDR4X-4266 on a 128-bit bus; Apple states the type, not the figure")),
    Chip("M2 Max", "Apple8", 38,
         Fact(13.6, METAL_BENCHMARKS, "GOPS32 13600 (38 cores, 1.398 GHz)"),
         Fact(400, "https://www.apple.com/newsroom/2023/01/apple-unveils-m2-pro-and-m2-max-next-generation-chips-for-next-level-workflows/",
              "400GB/s unified memory bandwidth")),
    Chip("M3 Max", "Apple9", 40,
         Fact(14.3, "https://hmc-tech.com/gpu/apple-32-core-m4-max-vs-apple-40-core-m3-max",
              "not published by Apple: 40 cores x 128 ALUs x 2 x 1.398 GHz; other sites assume 1.6 GHz (16.4)"),
         Fact(400, "https://macmegasite.com/2024/10/30/m4-max-chip-has-16-core-cpu-40-core-gpu-and-35-increase-in-memory-bandwidth",
              "400 GB/s (16-core CPU / 40-core GPU part; the 30-core part has 300)")),
    Chip("M4 Max", "Apple9", 40,
         Fact(17.2, "https://hmc-tech.com/gpu/apple-32-core-m4-max-vs-apple-40-core-m3-max",
              "not published by Apple: 40 cores x 128 ALUs x 2 x 1.678 GHz (the site's 32-core clock)"),
         Fact(546, "https://www.macrumors.com/2024/10/30/apple-announces-m4-max-chip/",
              "up to 546GB/s (40-core GPU part)")),
)


def family(name: str) -> GpuFamily:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise KeyError(f"no Apple GPU family {name!r}; known: {[f.name for f in FAMILIES]}")
