"""python -m mfa_hf.integrations.flash_attn_shim script.py [args...] | --install-pth [DIR] | --uninstall-pth [DIR]

Runs a script written for FlashAttention with `import flash_attn` served by mfa-hf (unless a real
flash_attn is installed), or writes/removes the .pth file that enables the shim for every run with
MFA_FLASH_ATTN_SHIM=1 (DIR: default the site-packages of this Python).
"""

from __future__ import annotations

import runpy
import sys
import sysconfig
from pathlib import Path

from . import PTH_LINE, PTH_NAME, install_flash_attn_shim


def _pth_path(args: list[str]) -> Path:
    return Path(args[0] if args else sysconfig.get_paths()["purelib"]) / PTH_NAME


def _usage_error(message: str) -> int:
    print(f"python -m mfa_hf.integrations.flash_attn_shim: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] in ("--install-pth", "--uninstall-pth"):
        path = _pth_path(argv[1:])
        if not path.parent.is_dir():
            return _usage_error(f"{argv[0]} {path.parent}: expected an existing folder (a site-packages), got none")
        if argv[0] == "--install-pth":
            path.write_text(PTH_LINE)
            print(f"wrote {path}: set MFA_FLASH_ATTN_SHIM=1 to serve `import flash_attn` with mfa-hf")
        elif path.exists():
            path.unlink()
            print(f"removed {path}")
        else:
            print(f"{path}: not there, nothing removed")
        return 0
    if not Path(argv[0]).is_file():
        return _usage_error(f"{argv[0]}: expected a Python script to run, got no such file")
    if not install_flash_attn_shim():
        print("mfa-hf: a real flash_attn is installed; it serves this run", file=sys.stderr)
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
