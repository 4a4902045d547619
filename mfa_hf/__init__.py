"""mfa-hf: flash attention for PyTorch on Apple Silicon, inside Hugging Face Transformers and Diffusers.

    import mfa_hf
    out = mfa_hf.flash_attn_func(q, k, v, causal=True)          # (B, S, H, D)
    out = mfa_hf.flash_attention(q, k, v, is_causal=True)       # (B, H, S, D)
"""

from . import dispatch, trace
from .api import flash_attention, flash_attention_chunked, flash_attn_func, flash_attn_varlen_func
from .custom_op_alias import register_custom_op  # torch.ops.mfa.flash_attention, as mps-flash-attn named it
from .dispatch import BackendUnavailable
from .kvcache import allocate_kv_cache, flash_attn_with_kvcache
from .quant import KVFormat, QuantizedKV, quantize_kv
from .quant_compat import (
    flash_attention_fp8,
    flash_attention_int8,
    flash_attention_nf4,
    quantize_kv_fp8,
    quantize_kv_int8,
    quantize_kv_nf4,
)
from .problem import AttentionProblem

__version__ = "0.1.0"

dispatch.load_all()

# transformers: make attn_implementation="mps_flash" / "mfa" work. Registration waits until
# transformers' modeling code is imported (an import hook), so `import mfa_hf` stays light for
# people who never use transformers. See integrations/transformers/autoregister.py.
from .integrations.transformers import autoregister as _tf_autoregister  # noqa: E402

_tf_autoregister.install()

# `import flash_attn` served by mfa-hf, only when asked for (MFA_FLASH_ATTN_SHIM=1; a real install wins).
from .integrations import flash_attn_shim as _flash_attn_shim  # noqa: E402  (light: no torch work)

if _flash_attn_shim.enabled_by_environment():
    _flash_attn_shim.install_flash_attn_shim()

# Names served by optional integrations, imported on first use so that `import mfa_hf` stays light
# (diffusers and transformers take seconds to import). name -> module that defines it.
_LAZY_EXPORTS = {
    "MFAProcessor": "mfa_hf.integrations.diffusers",
    "MFAJointAttnProcessor": "mfa_hf.integrations.diffusers",
    "MFACogVideoXAttnProcessor": "mfa_hf.integrations.diffusers",
    "MFAQuantizedCache": "mfa_hf.integrations.transformers.quantized_cache",
    # Opt-in SDPA patch: nothing is patched until replace_sdpa() or `with sdpa_patched():`.
    "replace_sdpa": "mfa_hf.integrations.sdpa_patch",
    "restore_sdpa": "mfa_hf.integrations.sdpa_patch",
    "sdpa_patched": "mfa_hf.integrations.sdpa_patch",
    # Opt-in `import flash_attn` for code written for FlashAttention-2 (a real install wins).
    "install_flash_attn_shim": "mfa_hf.integrations.flash_attn_shim",
    "uninstall_flash_attn_shim": "mfa_hf.integrations.flash_attn_shim",
    # mps-flash-attn's names whose meaning needs no other mfa_hf function (all of its names, with its
    # meanings, including flash_attention and convert_mask: `from mfa_hf import mps_flash_attn`).
    **{name: "mfa_hf.mps_flash_attn" for name in (
        "flash_attention_with_bias", "flash_attention_quantized", "is_available", "precompile", "clear_cache",
        "QUANT_FP8_E4M3", "QUANT_FP8_E5M2", "QUANT_INT8", "QUANT_NF4")},
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'mfa_hf' has no attribute {name!r}")


def __dir__():  # tab completion and dir() list the lazily imported names too
    return sorted(set(globals()) | set(_LAZY_EXPORTS))


__all__ = [
    "AttentionProblem",
    "BackendUnavailable",
    "KVFormat",
    "QUANT_FP8_E4M3",
    "QUANT_FP8_E5M2",
    "QUANT_INT8",
    "QUANT_NF4",
    "clear_cache",
    "flash_attention_quantized",
    "flash_attention_with_bias",
    "is_available",
    "precompile",
    "QuantizedKV",
    "allocate_kv_cache",
    "flash_attention",
    "flash_attention_chunked",
    "flash_attention_fp8",
    "flash_attention_int8",
    "flash_attention_nf4",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "quantize_kv",
    "quantize_kv_fp8",
    "quantize_kv_int8",
    "quantize_kv_nf4",
    "register_custom_op",
    "install_flash_attn_shim",
    "replace_sdpa",
    "restore_sdpa",
    "sdpa_patched",
    "trace",
    "uninstall_flash_attn_shim",
]
