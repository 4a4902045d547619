"""mfa-hf inside Hugging Face Transformers.

    import mfa_hf   # registers both names when transformers is imported
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="mps_flash")
    model.set_attn_implementation("mfa")   # neutral alias, plain AttentionInterface entry

"mfa" is the public tier: a plain AttentionInterface entry with compact masks (masks.py), registered
on every transformers release. "mps_flash" is a FlashAttention flavour (transformers' flash paths
for packing, varlen towers and continuous batching run on mfa-hf's FA2 surface); it needs private
transformers plumbing, so it is enabled by a contract probe (internals.py), never by a version list.
See README.md here.
"""

from __future__ import annotations

from . import internals
from .attention import mfa_attention_forward, mps_flash_attention_forward
from .internals import TESTED, ContractError, ProbeResult, cache_kwargs
from .masks import compact_mask, flash_mask
from .unsupported import UnsupportedModelError

FLASH_NAME = "mps_flash"
NEUTRAL_NAME = "mfa"
TESTED_TRANSFORMERS = TESTED  # the name earlier releases of mfa-hf exported
_registered = False


def register() -> ProbeResult:
    """Register "mfa" always and "mps_flash" when the contract probe passes (idempotent). Never raises
    for a transformers release: an untested one gets one RuntimeWarning; a failed probe makes
    "mps_flash" raise ContractError at model init."""
    global _registered
    from transformers import AttentionInterface, AttentionMaskInterface

    from . import fa_surface, unsupported

    if not _registered:
        AttentionInterface.register(NEUTRAL_NAME, mfa_attention_forward)
        AttentionMaskInterface.register(NEUTRAL_NAME, compact_mask)
        _registered = True
    result = internals.probe(FLASH_NAME, fa_surface.surface)
    if result.ok:
        AttentionInterface.register(FLASH_NAME, mps_flash_attention_forward)
        # The flash flavour takes transformers' FA mask (None or the 2-D padding mask), as FA2 does.
        AttentionMaskInterface.register(FLASH_NAME, flash_mask)
        internals.warn_if_untested(result.version)
    unsupported.install(FLASH_NAME, (FLASH_NAME, NEUTRAL_NAME), lambda: internals.verify(mps_flash_attention_forward, FLASH_NAME))
    return result


__all__ = [
    "FLASH_NAME",
    "NEUTRAL_NAME",
    "TESTED",
    "TESTED_TRANSFORMERS",
    "ContractError",
    "ProbeResult",
    "UnsupportedModelError",
    "cache_kwargs",
    "compact_mask",
    "mfa_attention_forward",
    "mps_flash_attention_forward",
    "register",
]
