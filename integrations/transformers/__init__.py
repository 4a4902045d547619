"""mfa-hf inside Hugging Face Transformers.

    import mfa_hf   # registers both names when transformers is imported
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="mps_flash")
    model.set_attn_implementation("mfa")   # neutral alias, plain AttentionInterface entry

"mps_flash" is a FlashAttention flavour: transformers' flash paths (2-D padding masks unpadded to
varlen, `cu_seq_lens_*` packing, varlen vision towers) run on mfa-hf's FA2 surface. "mfa" is a
plain AttentionInterface entry with compact masks (masks.py). See README.md here.
"""

from __future__ import annotations

from .attention import mfa_attention_forward, mps_flash_attention_forward
from .compat import TESTED_TRANSFORMERS, check_transformers_version
from .masks import compact_mask
from .unsupported import UnsupportedModelError

FLASH_NAME = "mps_flash"
NEUTRAL_NAME = "mfa"
_registered = False


def register() -> None:
    """Register "mps_flash" and "mfa" with transformers (idempotent). Raises on untested versions."""
    global _registered
    if _registered:
        return
    check_transformers_version()
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    from . import provider, unsupported

    provider.install()
    unsupported.install((FLASH_NAME, NEUTRAL_NAME))
    AttentionInterface.register(FLASH_NAME, mps_flash_attention_forward)
    # The flash flavour takes transformers' FA mask (None or the 2-D padding mask), as FA2 does.
    AttentionMaskInterface.register(FLASH_NAME, flash_attention_mask)
    AttentionInterface.register(NEUTRAL_NAME, mfa_attention_forward)
    AttentionMaskInterface.register(NEUTRAL_NAME, compact_mask)
    _registered = True


__all__ = [
    "FLASH_NAME",
    "NEUTRAL_NAME",
    "TESTED_TRANSFORMERS",
    "UnsupportedModelError",
    "check_transformers_version",
    "compact_mask",
    "mfa_attention_forward",
    "mps_flash_attention_forward",
    "register",
]
