"""Set-time checks: does an attention module have the shape of contract a processor serves?

Each MFA processor serves exactly one upstream contract. These checks run when `enable()`,
`set_processor()` or (through set_time.py) diffusers' own set_attn_processor/set_processor attach a
processor, so a mismatch fails before any denoising; and again, cheaply, at the top of every
processor call, for when set_time.py's wrappers are not installed (a failed probe, internals.py).
"""

from __future__ import annotations

from torch import nn

from . import internals


class ContractMismatch(TypeError):
    """A processor was attached to an attention module whose contract it does not serve."""


def attention_class():
    from diffusers.models.attention_processor import Attention

    return Attention


def require_legacy_attention(processor_name: str, attn: nn.Module, serves: str) -> None:
    """The processors that call SDPA directly run on diffusers' `Attention` module only."""
    if not isinstance(attn, attention_class()):
        hint = ""
        if internals.uses_dispatcher(getattr(attn, "processor", None)):
            hint = (" This module's processor uses diffusers' dispatcher: use "
                    "model.set_attention_backend('mfa') or mfa_hf.integrations.diffusers.enable(model).")
        raise ContractMismatch(
            f"{processor_name}: expected a diffusers `Attention` module ({serves}), "
            f"got {type(attn).__name__}.{hint}"
        )


ENABLE = "mfa_hf.integrations.diffusers.enable(model), which picks per module"


def require_no_added_kv(processor_name: str, attn: nn.Module, serves: str, use_instead: str) -> None:
    if _added_kv(attn):
        # MFAJointAttnProcessor serves added K/V without the UNet extras only: a hint to it on a module with them
        # sent the user back here (session 25)
        use = ENABLE if _extras_used(attn) else f"{use_instead}, or {ENABLE}"
        raise ContractMismatch(
            f"{processor_name}: expected an Attention without added K/V projections ({serves}), got one "
            f"with added_kv_proj_dim={attn.added_kv_proj_dim} (context_pre_only={attn.context_pre_only}); "
            f"use {use}."
        )


def require_plain_io(processor_name: str, attn: nn.Module, serves: str) -> None:
    """Contracts that skip the UNet/VAE extras must not sit on a module configured to use them."""
    used = _extras_used(attn)
    if used:
        # MFAProcessor serves the extras but not added K/V projections
        use = ENABLE if _added_kv(attn) else "MFAProcessor (the AttnProcessor2_0 contract)"
        raise ContractMismatch(
            f"{processor_name}: expected an Attention without {', '.join(used)} ({serves} ignores them), "
            f"got one that uses them; use {use}."
        )


def _added_kv(attn: nn.Module) -> bool:
    return getattr(attn, "added_kv_proj_dim", None) is not None


def _extras_used(attn: nn.Module) -> list[str]:
    """The UNet/VAE extras that `attn` is configured to use."""
    extras = {
        "group_norm": attn.group_norm is not None,
        "spatial_norm": attn.spatial_norm is not None,
        "norm_cross": attn.norm_cross is not None,
        "residual_connection": bool(attn.residual_connection),
        "rescale_output_factor": attn.rescale_output_factor != 1.0,
    }
    return [name for name, present in extras.items() if present]
