"""A CPU emulator for Metal Shading Language compute kernels, with torch.mps.compile_shader's API.

    from mfa_hf.kernels.metal.emulator import compile_shader
    lib = compile_shader(msl_source)          # clang >= 17 required (see README.md)
    lib.kernel_name(out, x, 1.5, threads=n)   # CPU tensors, results written in place

See README.md in this folder for what it proves and what only Apple's compiler and GPUs can.
"""

from .arguments import EmulatorWarning
from .compiler import CompilerNotFound, MetalCompileError, UnsafeCacheError, find_compiler
from .targets import Target, bfloat_available, current_target, emulate, msl_version_for
from .kernel_signatures import KernelSourceError
from .library import EmulatedKernel, EmulatedLibrary, EmulatorRuntimeError, compile_shader
from .runtime_select import MetalRuntime, emulator_enabled, metal_runtime, with_defines
from .schedules import SCHEDULES, TWO_SCHEDULES, run_two_schedules

__all__ = [
    "compile_shader", "run_two_schedules", "metal_runtime", "MetalRuntime", "emulator_enabled", "with_defines",
    "EmulatedLibrary", "EmulatedKernel", "EmulatorWarning", "EmulatorRuntimeError", "MetalCompileError",
    "CompilerNotFound", "KernelSourceError", "UnsafeCacheError", "find_compiler", "SCHEDULES", "TWO_SCHEDULES",
    "Target", "current_target", "emulate", "msl_version_for", "bfloat_available",
]
