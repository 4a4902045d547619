"""The emulator's compile-time error, shared by the compiler and the source checks."""


class MetalCompileError(RuntimeError):
    """The kernel source does not compile, here or (by a rule the emulator enforces) on a Mac; the
    message quotes the offending MSL lines."""
