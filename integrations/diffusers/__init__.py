"""Flash attention for diffusers: processors, the "mfa" dispatcher backend, and enable().

    from mfa_hf.integrations.diffusers import enable
    handle = enable(pipe)          # every attention module of the pipeline runs our kernel
    handle.restore()               # the original processors and backends are back

Importing this package runs the probe of the diffusers internals the private tier uses
(internals.py): when it passes, the "mfa" dispatcher backend is registered and the set-time contract
checks (set_time.py) are installed, whatever diffusers' version; a release we have not tested, or a
failed probe, gets one RuntimeWarning. When it fails, the processors still work (they check their
module on every call) and the backend's entry points raise UnsupportedDiffusersInternals. See
README.md in this folder.
"""

from .compat import (
    TESTED_DIFFUSERS,
    ProbeResult,
    UnsupportedDiffusersInternals,
    UnsupportedDiffusersVersion,
)
from .contracts import ContractMismatch
from .dispatcher import BACKEND_NAME, mfa_attention
from .enable import MFAHandle, attention_modules, enable, set_processor
from .internals import probe, register_mfa_backend
from .processors import MFACogVideoXAttnProcessor, MFAJointAttnProcessor, MFAProcessor

try:
    probe()  # never raises by itself; the result is cached before its warning is issued
except Warning:
    pass  # warnings turned into errors (-W error): importing must still work, and the result stands

__all__ = [
    "BACKEND_NAME",
    "ContractMismatch",
    "MFACogVideoXAttnProcessor",
    "MFAHandle",
    "MFAJointAttnProcessor",
    "MFAProcessor",
    "ProbeResult",
    "TESTED_DIFFUSERS",
    "UnsupportedDiffusersInternals",
    "UnsupportedDiffusersVersion",
    "attention_modules",
    "enable",
    "mfa_attention",
    "probe",
    "register_mfa_backend",
    "set_processor",
]
