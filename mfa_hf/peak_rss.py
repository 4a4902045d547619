"""This process's own peak resident set size, for the CPU's memory figures (tests, benchmarks, generate).

getrusage's ru_maxrss is not it on Linux: exec keeps the high-water mark of the image it replaces, so a
subprocess started from a large process (pytest after a thousand tests, a benchmark driver holding a model)
reports its parent's peak when that is higher (a child of a 2 GiB parent read 2 GiB, its own peak 13 MiB).
/proc/self/status's VmHWM belongs to the current address space, which exec makes new. Elsewhere (macOS)
ru_maxrss is what there is, and it counts bytes there, KiB on Linux.
"""

from __future__ import annotations

import resource
import sys

_STATUS = "/proc/self/status"


def peak_rss_bytes() -> int:
    try:
        with open(_STATUS) as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:   13636 kB"
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
