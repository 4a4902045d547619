"""Flash attention for diffusers: processors, the "mfa" dispatcher backend, and enable().

    from mfa_hf.integrations.diffusers import enable
    handle = enable(pipe)          # every attention module of the pipeline runs our kernel
    handle.restore()               # the original processors and backends are back

Importing this package registers the "mfa" dispatcher backend and the set-time contract checks
(set_time.py) when the installed diffusers is one we test (compat.SUPPORTED_DIFFUSERS_VERSIONS);
elsewhere the processors still import, check their module on every call, and the backend's entry
points raise UnsupportedDiffusersVersion. See README.md in this folder.
"""

from .compat import SUPPORTED_DIFFUSERS_VERSIONS, UnsupportedDiffusersVersion, diffusers_version_supported
from .contracts import ContractMismatch
from .dispatcher import BACKEND_NAME, mfa_attention, register_mfa_backend
from .enable import MFAHandle, attention_modules, enable, set_processor
from .processors import MFACogVideoXAttnProcessor, MFAJointAttnProcessor, MFAProcessor
from . import set_time

if diffusers_version_supported():
    register_mfa_backend()
    set_time.install()  # MFA processors refuse a wrong module when set, not on their first call

__all__ = [
    "BACKEND_NAME",
    "ContractMismatch",
    "MFACogVideoXAttnProcessor",
    "MFAHandle",
    "MFAJointAttnProcessor",
    "MFAProcessor",
    "SUPPORTED_DIFFUSERS_VERSIONS",
    "UnsupportedDiffusersVersion",
    "attention_modules",
    "enable",
    "mfa_attention",
    "register_mfa_backend",
    "set_processor",
]
