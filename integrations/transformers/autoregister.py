"""Register with transformers when (and only when) it is used, so `import mfa_hf` stays light.

`import mfa_hf` must make attn_implementation="mps_flash" work, but importing transformers costs
~2 s, too much to charge people who never use it. So:
- if `transformers.modeling_utils` is already imported, register now;
- otherwise a meta-path finder waits for `transformers.modeling_utils` (imported by every model class
  before any `from_pretrained`/`from_config` can validate a name) and registers right after it runs.
Importing transformers only for tokenizers therefore costs nothing extra.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

_TRIGGER = "transformers.modeling_utils"


def _register_safely() -> None:
    # An import hook must never break the user's `import transformers`: report, don't raise. The
    # names then stay unregistered and transformers itself refuses them at model init.
    from . import register

    try:
        register()
    except Exception as err:  # noqa: BLE001 - surfaced as a warning with the reason
        warnings.warn(f"mfa_hf could not register with transformers: {err}", RuntimeWarning, stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of transformers.modeling_utils."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _uninstall()
        _register_safely()


_finder = _RegisterAfterImport()


def _uninstall() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


def install() -> None:
    """Register now if transformers' models are loaded, else when they get loaded."""
    if _TRIGGER in sys.modules:
        _register_safely()
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
