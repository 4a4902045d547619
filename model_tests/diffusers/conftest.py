"""Shared pieces of the diffusers conformance suite: tiny models built from configs, and the
default-vs-MFA comparison every model test runs.

Each builder returns (model, inputs) with fixed seeds; configs are fresh dicts per call, so no two
models share a config object. Sizes are chosen so that every path is exercised (cross-attention with
Lk != Lq, masks with padded keys, GQA-free multi-head) while a forward stays well under a second.
"""

from __future__ import annotations

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from mfa_hf import trace  # noqa: E402
from mfa_hf.integrations.diffusers import attention_modules, enable  # noqa: E402
from mfa_hf.testing import assert_close_to_reference  # noqa: E402

BATCH = 2
TEXT_LEN = 7

# fp32: the bound. Low precision: DESIGN.md's rule at model level (see compare_low_precision).
FP32_TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def _padding_mask(dtype=torch.float32) -> torch.Tensor:
    """(B, TEXT_LEN) key mask, 1/True = keep; the second sample's last 3 text tokens are padding."""
    mask = torch.ones(BATCH, TEXT_LEN, dtype=dtype)
    mask[1, 4:] = 0
    return mask


def build_unet():
    model = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    inputs = dict(sample=torch.randn(BATCH, 4, 16, 16), timestep=torch.tensor(10),
                  encoder_hidden_states=torch.randn(BATCH, TEXT_LEN, 32), encoder_attention_mask=_padding_mask())
    return model, inputs


def build_vae():
    model = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return model, dict(sample=torch.randn(BATCH, 3, 32, 32))


def build_pixart():
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=32, norm_num_groups=1)
    inputs = dict(hidden_states=torch.randn(BATCH, 4, 8, 8), encoder_hidden_states=torch.randn(BATCH, TEXT_LEN, 32),
                  encoder_attention_mask=_padding_mask(), timestep=torch.tensor([10, 20]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return model, inputs


def _build_sd3(dual_attention_layers=(), qk_norm=None):
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=dual_attention_layers, qk_norm=qk_norm)
    inputs = dict(hidden_states=torch.randn(BATCH, 4, 8, 8), encoder_hidden_states=torch.randn(BATCH, TEXT_LEN, 32),
                  pooled_projections=torch.randn(BATCH, 16), timestep=torch.tensor([10, 20]))
    return model, inputs


def build_sd3():
    return _build_sd3()


def build_sd35():
    """SD3.5: a dual-attention layer (image-only attn2) and RMS qk-norm, also on the context."""
    return _build_sd3(dual_attention_layers=(0,), qk_norm="rms_norm")


def build_cogvideox():
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=True)
    frames, video_tokens = 3, 3 * 4 * 4
    angles = torch.randn(video_tokens, 8)
    inputs = dict(hidden_states=torch.randn(BATCH, frames, 4, 8, 8),
                  encoder_hidden_states=torch.randn(BATCH, TEXT_LEN, 16), timestep=torch.tensor([10, 20]),
                  image_rotary_emb=(angles.cos(), angles.sin()))
    return model, inputs


def build_flux():
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    image_len = 16
    inputs = dict(hidden_states=torch.randn(BATCH, image_len, 4), encoder_hidden_states=torch.randn(BATCH, TEXT_LEN, 32),
                  pooled_projections=torch.randn(BATCH, 16), timestep=torch.tensor([0.1, 0.2]),
                  img_ids=torch.randn(image_len, 3), txt_ids=torch.randn(TEXT_LEN, 3))
    return model, inputs


def build_wan():
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    inputs = dict(hidden_states=torch.randn(BATCH, 4, 2, 8, 8), timestep=torch.tensor([10, 20]),
                  encoder_hidden_states=torch.randn(BATCH, TEXT_LEN, 16))
    return model, inputs


def build_ltx():
    model = diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, caption_channels=16)
    inputs = dict(hidden_states=torch.randn(BATCH, 2 * 4 * 4, 4), encoder_hidden_states=torch.randn(BATCH, TEXT_LEN, 16),
                  timestep=torch.tensor([10, 20]), encoder_attention_mask=_padding_mask(),
                  num_frames=2, height=4, width=4)
    return model, inputs


def build_qwenimage():
    model = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6))
    inputs = dict(hidden_states=torch.randn(BATCH, 16, 16), encoder_hidden_states=torch.randn(BATCH, TEXT_LEN, 16),
                  encoder_hidden_states_mask=_padding_mask(torch.bool), timestep=torch.tensor([0.1, 0.2]),
                  img_shapes=[(1, 4, 4)] * BATCH)
    return model, inputs


def build_dit():
    """DiT has no set_attn_processor: enable() must walk its modules."""
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, norm_num_groups=1)
    inputs = dict(hidden_states=torch.randn(BATCH, 4, 8, 8), timestep=torch.tensor([1, 2]),
                  class_labels=torch.tensor([1, 2]))
    return model, inputs


BUILDERS = {
    "unet": build_unet, "vae": build_vae, "pixart": build_pixart, "sd3": build_sd3, "sd35": build_sd35,
    "cogvideox": build_cogvideox, "flux": build_flux, "wan": build_wan, "ltx": build_ltx, "qwenimage": build_qwenimage,
    "dit": build_dit,
}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model, inputs = BUILDERS[name]()
    return model.eval(), inputs


def first_tensor(output) -> torch.Tensor:
    """`sample` of a diffusers output, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def kernel_forward_calls(captured) -> int:
    """Forward calls of our kernel, whichever backend served them (torch on CPU, metal on mps...)."""
    return sum(n for (backend, op), n in trace.served_by(captured).items() if op == "fwd")


def run_counting(model, inputs):
    with torch.no_grad(), trace.capture() as captured:
        output = first_tensor(model(**inputs))
    return output, kernel_forward_calls(captured)


def cast_inputs(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


def default_and_ours(name: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(default model, MFA model with the same weights, inputs, handle); the copy is made before enable()."""
    default, inputs = build(name, seed)
    default, inputs = default.to(dtype), cast_inputs(inputs, dtype)
    ours = copy.deepcopy(default)
    handle = enable(ours)
    return default, ours, inputs, handle


def assert_runs_like_default(name: str) -> None:
    """fp32: same output as the default processors within 1e-5, and every attention module ran our
    kernel exactly once (the default model, for its part, never reached it)."""
    default, ours, inputs, handle = default_and_ours(name)
    expected, default_calls = run_counting(default, inputs)
    actual, our_calls = run_counting(ours, inputs)
    modules = sum(1 for _ in attention_modules(ours))
    assert default_calls == 0, f"{name}: the default model reached our kernel ({default_calls} calls)"
    assert our_calls == modules, f"{name}: expected {modules} kernel calls (one per attention module), got {our_calls}"
    torch.testing.assert_close(actual, expected, **FP32_TOLERANCE)
    handle.restore()


def assert_low_precision_rule(name: str, dtype: torch.dtype) -> None:
    """DESIGN.md's rule at model level: |ours(dtype) - default(fp32)| <= 2 |default(dtype) - default(fp32)| + floor."""
    default32, _ = build(name)
    _, inputs = build(name)
    reference, _ = run_counting(default32, inputs)
    default_low, ours_low, inputs_low, _ = default_and_ours(name, dtype)
    baseline, _ = run_counting(default_low, inputs_low)
    actual, calls = run_counting(ours_low, inputs_low)
    assert calls > 0, f"{name}: our kernel did not run in {dtype}"
    assert_close_to_reference(actual, reference.to(torch.float64), baseline, name=f"{name} {dtype}")


@pytest.fixture
def active_backend_guard():
    """Restore diffusers' global active backend after tests that change it on purpose."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    yield before
    _AttentionBackendRegistry.set_active_backend(before)


@pytest.fixture(scope="session")
def tiny():
    """The helpers above, for test modules (conftest cannot be imported under --import-mode=importlib)."""
    import types

    return types.SimpleNamespace(
        build=build, default_and_ours=default_and_ours, run_counting=run_counting, first_tensor=first_tensor,
        assert_runs_like_default=assert_runs_like_default, assert_low_precision_rule=assert_low_precision_rule,
        kernel_forward_calls=kernel_forward_calls, padding_mask=_padding_mask, BATCH=BATCH, TEXT_LEN=TEXT_LEN,
    )
