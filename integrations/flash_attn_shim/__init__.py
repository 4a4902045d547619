"""Opt-in `flash_attn` drop-in: `from flash_attn import flash_attn_func` gets mfa-hf's kernels.

Enable it one of three ways (nothing happens by default):
- in code: `mfa_hf.install_flash_attn_shim()` before the first `import flash_attn`;
- for an unchanged script: `python -m mfa_hf.integrations.flash_attn_shim script.py [args...]`;
- for every Python run with MFA_FLASH_ATTN_SHIM=1 in the environment: once,
  `python -m mfa_hf.integrations.flash_attn_shim --install-pth` (writes a one-line .pth file into
  site-packages; `--uninstall-pth` removes it). `import mfa_hf` with that variable set also enables it.

A real FlashAttention install always wins: the finder sits at the end of sys.meta_path, after the
path finder that would find the real package, and install_flash_attn_shim() does nothing when one
is importable. The shim has no distribution metadata, so transformers' is_flash_attn_2_available()
stays False and transformers does not route to it on its own.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

ENV_VAR = "MFA_FLASH_ATTN_SHIM"
VERSION = "2.8.3+mfahf"  # FA2's API level the shim follows (its newest release); the local label marks it as ours
# Served module -> (our module in this package, extra names beyond its __all__, is a package).
_SERVED = {
    "flash_attn": ("interface", (), True),
    "flash_attn.flash_attn_interface": ("interface", ("_get_block_size_n", "USE_TRITON_ROCM"), False),
    "flash_attn.bert_padding": ("bert_padding", (), False),
    "flash_attn.layers": (None, (), True),
    "flash_attn.layers.rotary": ("rotary", (), False),
}
_MODULES = tuple(_SERVED)


class _ShimFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the `flash_attn` modules of _SERVED from this package's interface.py, bert_padding.py
    and rotary.py."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _SERVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=_SERVED[fullname][2])

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module):
        source, extra, _ = _SERVED[module.__name__]
        names: list[str] = []
        if source is not None:
            # local: importing torch and the kernels waits for the first use
            ours = importlib.import_module(f"{__name__}.{source}")
            names = list(ours.__all__)
            for name in (*names, *extra):
                setattr(module, name, getattr(ours, name))
        module.__all__ = names
        module.__version__ = VERSION
        module.__mfa_hf_shim__ = True


_finder = _ShimFinder()


def real_flash_attn_available() -> bool:
    """Whether a real `flash_attn` is importable (looked up without the shim)."""
    installed = _finder in sys.meta_path
    if installed:
        sys.meta_path.remove(_finder)
    try:
        module = sys.modules.get("flash_attn")
        if module is not None:
            return not getattr(module, "__mfa_hf_shim__", False)
        return importlib.util.find_spec("flash_attn") is not None
    finally:
        if installed:
            sys.meta_path.append(_finder)


def install_flash_attn_shim() -> bool:
    """Make `import flash_attn` serve mfa-hf's kernels. Returns False (and does nothing) when a real
    flash_attn is importable, since the real one always wins."""
    if real_flash_attn_available():
        return False
    if _finder not in sys.meta_path:
        sys.meta_path.append(_finder)  # last: any real package found on sys.path comes first
    return True


def uninstall_flash_attn_shim() -> None:
    """Remove the finder and forget shim modules already imported."""
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    for name in _MODULES:
        if getattr(sys.modules.get(name), "__mfa_hf_shim__", False):
            del sys.modules[name]


def enabled_by_environment() -> bool:
    return os.environ.get(ENV_VAR, "0").strip() not in ("", "0")


PTH_NAME = "mfa_hf_flash_attn_shim.pth"
# Run by Python's site module at every start-up, so: one line that imports nothing but os unless the
# variable is set, and stays quiet when mfa-hf is gone (`pip uninstall` leaves this file behind).
# Any other import failure is reported, as site reports errors in .pth files.
_PTH_CODE = (
    "try:\n"
    "    from mfa_hf.integrations.flash_attn_shim import install_flash_attn_shim\n"
    "except ModuleNotFoundError as missing:\n"
    "    if missing.name != 'mfa_hf': raise\n"
    "else:\n"
    "    install_flash_attn_shim()\n"
)
PTH_LINE = f"import os; os.environ.get({ENV_VAR!r}, '0').strip() not in ('', '0') and exec({_PTH_CODE!r})\n"
