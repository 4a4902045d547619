"""Make mfa-hf a FlashAttention provider for the name "mps_flash".

Why a hook at all: any attn_implementation containing "flash" makes transformers call
`lazy_import_flash_attention(name)` (model init, `set_attn_implementation`, and every forward through
`_flash_attention_forward`). For a name that is neither flash_attention_{2,3,4} nor a hub repo, its
`_lazy_imports` ends in the hub-kernel loader and raises "Could not find the currently requested
flash attention implementation".

Choice: wrap `modeling_flash_attention_utils._lazy_imports`, the one function every caller goes
through (it is looked up as a module global at call time, so one attribute replacement reaches
modeling_utils, masking and generation alike). For "mps_flash" it returns our FA2 surface plus
transformers' own pad/unpad helpers; every other name goes to the original unchanged.
Rejected alternatives:
- pre-seeding `_loaded_implementation`/`_flash_fn` globals: breaks as soon as another flash name is
  loaded in the same process (the globals are overwritten, and re-loading "mps_flash" then hits the
  hub loader and raises);
- the hub-kernel route (`load_and_register_attn_kernel`): needs the `kernels` package, a repo-shaped
  name ("org/name") and a hub download; the issue fixes the name to "mps_flash".
The wrapper is idempotent, keeps the original reachable (`uninstall`), and is only installed on the
transformers versions in compat.TESTED_TRANSFORMERS.
"""

from __future__ import annotations

import inspect

NAME = "mps_flash"
_ORIGINAL_ATTR = "_mfa_original_lazy_imports"


def _expected_signature_ok(fn) -> bool:
    params = list(inspect.signature(fn).parameters)
    return params[:1] == ["implementation"]


def install() -> None:
    """Route `_lazy_imports("mps_flash")` to mfa-hf; leave every other implementation untouched."""
    from transformers import modeling_flash_attention_utils as mfu

    if hasattr(mfu, _ORIGINAL_ATTR):
        return
    original = mfu._lazy_imports
    if not _expected_signature_ok(original):
        raise RuntimeError(
            "mfa_hf: transformers.modeling_flash_attention_utils._lazy_imports has signature "
            f"{inspect.signature(original)}, expected (implementation, ...); cannot provide {NAME!r}."
        )

    def _lazy_imports(implementation, *args, **kwargs):
        if implementation != NAME:
            return original(implementation, *args, **kwargs)
        from .fa_surface import surface

        flash_fn, varlen_fn, kvcache_fn = surface()
        return flash_fn, varlen_fn, kvcache_fn, mfu._pad_input, mfu._unpad_input

    _lazy_imports.__doc__ = original.__doc__
    setattr(mfu, _ORIGINAL_ATTR, original)
    mfu._lazy_imports = _lazy_imports


def uninstall() -> None:
    """Restore transformers' own `_lazy_imports` (tests; never needed by users)."""
    from transformers import modeling_flash_attention_utils as mfu

    original = getattr(mfu, _ORIGINAL_ATTR, None)
    if original is not None:
        mfu._lazy_imports = original
        delattr(mfu, _ORIGINAL_ATTR)
        if mfu._loaded_implementation == NAME:
            mfu._loaded_implementation = None
