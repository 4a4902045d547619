"""A processor on a module whose contract it does not serve fails clearly at set time: through
enable()/set_processor() and, when the probe of diffusers' internals passes, through diffusers' own
set_attn_processor/set_processor (set_time.py); otherwise before any tensor work on its first call."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor

from mfa_hf.integrations.diffusers import (
    ContractMismatch,
    MFACogVideoXAttnProcessor,
    MFAJointAttnProcessor,
    MFAProcessor,
    enable,
    set_processor,
)
from mfa_hf.integrations.diffusers import internals


def _processor_classes(model):
    return {name: type(p).__name__ for name, p in model.attn_processors.items()}


def test_joint_processor_on_unet_is_refused_at_set_time(tiny):
    unet, _ = tiny.build("unet")
    before = _processor_classes(unet)
    with pytest.raises(ContractMismatch, match=r"MFAJointAttnProcessor: serves the JointAttnProcessor2_0 contract, "
                                               r"but these modules follow another one: .*AttnProcessor2_0"):
        set_processor(unet, MFAJointAttnProcessor())
    assert _processor_classes(unet) == before, "a refused set_processor must change nothing"


def test_attn_processor_on_flux_is_refused_at_set_time_with_the_dispatcher_hint(tiny):
    flux, _ = tiny.build("flux")
    with pytest.raises(ContractMismatch, match="FluxAttnProcessor"):
        set_processor(flux, MFAProcessor())
    with pytest.raises(ContractMismatch, match=r"expected a diffusers `Attention` module .* got FluxAttention\. "
                                               r".*set_attention_backend\('mfa'\)"):
        MFAProcessor().check(next(m for m in flux.modules() if type(m).__name__ == "FluxAttention"))


def test_attn_processor_on_sd3_joint_module_is_refused_by_check(tiny):
    sd3, _ = tiny.build("sd3")
    joint_module = sd3.transformer_blocks[0].attn
    with pytest.raises(ContractMismatch, match="added_kv_proj_dim=.*use MFAJointAttnProcessor"):
        MFAProcessor().check(joint_module)


def test_wrong_processor_set_by_diffusers_is_refused_at_set_time_and_changes_nothing(tiny):
    sd3, _ = tiny.build("sd3")
    before = _processor_classes(sd3)
    with pytest.raises(ContractMismatch, match="MFAProcessor: expected an Attention without added K/V projections"):
        sd3.set_attn_processor(MFAProcessor())
    assert _processor_classes(sd3) == before, "a refused set_attn_processor must change nothing"
    module = sd3.transformer_blocks[0].attn
    with pytest.raises(ContractMismatch, match="added_kv_proj_dim"):
        module.set_processor(MFAProcessor())
    assert type(module.processor).__name__ == before["transformer_blocks.0.attn.processor"]


def test_without_the_set_time_checks_a_wrong_processor_fails_on_first_call_not_with_a_shape_error(tiny):
    sd3, inputs = tiny.build("sd3")
    internals.uninstall_set_time_checks()  # as after a failed probe
    try:
        sd3.set_attn_processor(MFAProcessor())
    finally:
        internals.install_set_time_checks()
    with pytest.raises(ContractMismatch, match="MFAProcessor: expected an Attention without added K/V projections"):
        with torch.no_grad():
            sd3(**inputs)


def test_attn_processor_refuses_rotary_embeddings(tiny):
    """Refused at set time (the modules follow CogVideoXAttnProcessor2_0, another contract), and, without the
    set-time checks, at the first call with the rotary embeddings named."""
    cog, inputs = tiny.build("cogvideox")
    with pytest.raises(ContractMismatch, match="its processor CogVideoXAttnProcessor2_0 does not compute what "
                                               "MFAProcessor serves"):
        cog.set_attn_processor(MFAProcessor())
    internals.uninstall_set_time_checks()
    try:
        cog.set_attn_processor(MFAProcessor())
    finally:
        internals.install_set_time_checks()
    with pytest.raises(ContractMismatch, match="expected no image_rotary_emb .*MFACogVideoXAttnProcessor"):
        with torch.no_grad():
            cog(**inputs)


def test_a_processor_of_other_math_is_never_replaced_by_ours(tiny):
    """Found by a model sweep: Sana's linear attention (and CogView3Plus's processor) sit in plain Attention modules;
    set_attn_processor(MFAProcessor()) put softmax attention there (0.11 off, silently, or a later shape error).
    The module's current processor must follow the contract ours serves."""
    import diffusers

    sana = diffusers.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                            num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                            cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=1)
    before = _processor_classes(sana)
    with pytest.raises(ContractMismatch, match="its processor SanaLinearAttnProcessor2_0 does not compute what"):
        sana.set_attn_processor(MFAProcessor())
    assert _processor_classes(sana) == before, "a refused set_attn_processor must change nothing"


class _OwnMathProcessor:
    """A processor that computes its attention without SDPA (nothing to route)."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return hidden_states


def test_modules_without_set_processor_are_reported_not_passed_over():
    """Mochi's attention holds a processor but has no set_processor. Its own processor calls SDPA, so enable()
    routes those calls around the module's forward (test_routed_modules.py); a processor there that does not call
    SDPA is listed as skipped (strict refuses) instead of returning with nothing changed and nothing said."""
    import diffusers

    from mfa_hf.integrations.diffusers import enable

    mochi = diffusers.MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                              pooled_projection_dim=16, in_channels=4, text_embed_dim=16,
                                              time_embed_dim=8, max_sequence_length=7)
    attention = next(m for m in mochi.modules() if callable(getattr(m, "processor", None)))
    assert not hasattr(attention, "set_processor")
    attention.processor = _OwnMathProcessor()
    handle = enable(mochi)
    assert handle.skipped and all("no set_processor" in why for why in handle.skipped.values()), handle.skipped
    handle.restore()
    with pytest.raises(ContractMismatch, match="enable\\(strict=True\\).*no set_processor"):
        enable(mochi, strict=True)


def test_joint_and_cogvideox_processors_refuse_vae_style_modules(tiny):
    vae, _ = tiny.build("vae")
    vae_attention = next(m for m in vae.modules() if hasattr(m, "set_processor"))
    for processor in (MFAJointAttnProcessor(), MFACogVideoXAttnProcessor()):
        with pytest.raises(ContractMismatch, match="expected an Attention without group_norm, residual_connection"):
            processor.check(vae_attention)


def test_enable_strict_refuses_unknown_processors_and_lists_them_otherwise(tiny):
    unet, _ = tiny.build("unet")
    unet.set_attn_processor(SlicedAttnProcessor(slice_size=1))
    with pytest.raises(ContractMismatch, match=r"enable\(strict=True\): .*SlicedAttnProcessor"):
        enable(unet, strict=True)
    assert set(_processor_classes(unet).values()) == {"SlicedAttnProcessor"}
    handle = enable(unet)
    assert len(handle.skipped) == len(unet.attn_processors) and not handle.processors


def test_set_processor_refuses_foreign_processors(tiny):
    unet, _ = tiny.build("unet")
    with pytest.raises(TypeError, match="processor: expected one of .*got AttnProcessor2_0"):
        set_processor(unet, AttnProcessor2_0())


def test_enable_refuses_something_that_is_not_a_pipeline():
    with pytest.raises(TypeError, match=r"pipe_or_model: expected a diffusers pipeline .* got str"):
        enable("unet")



def _unet_with_added_kv():
    """A UNet with SimpleCrossAttn blocks (Kandinsky/UnCLIP style): added K/V projections and group_norm."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, cross_attention_dim=32, attention_head_dim=8,
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "SimpleCrossAttnUpBlock2D"))


@pytest.mark.parametrize("model", ["unet-added-kv", "sd3", "vae"])
def test_a_refusal_hint_never_leads_back(model, tiny):
    """Found by a model sweep (session 25): MFAProcessor on a module with added K/V and group_norm said "use
    MFAJointAttnProcessor", whose refusal said "use MFAProcessor". For every module and each of our processors that
    refuses it, the processor its message names is either accepted or points to enable(), and enable() serves."""
    built = _unet_with_added_kv() if model == "unet-added-kv" else tiny.build(model)[0]
    ours = {"MFAProcessor": MFAProcessor, "MFAJointAttnProcessor": MFAJointAttnProcessor,
            "MFACogVideoXAttnProcessor": MFACogVideoXAttnProcessor}
    refusals = 0
    for module in (m for m in built.modules() if hasattr(m, "set_processor")):
        for name, processor in ours.items():
            try:
                processor().check(module)
                continue
            except ContractMismatch as error:
                refusals += 1
                hint = str(error).split("; use ", 1)[-1]
            named = [other for other in ours if other in hint and other != name]
            for other in named:  # the named processor serves the module, or its own refusal names enable()
                try:
                    ours[other]().check(module)
                except ContractMismatch as again:
                    assert "enable(model)" in str(again) and name not in str(again).split("; use ", 1)[-1], again
            assert named or "enable(model)" in hint, error
    assert refusals
    handle = enable(built)
    assert handle.processors and not handle.skipped, handle.skipped
