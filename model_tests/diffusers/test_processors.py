"""MFAProcessor on standalone Attention modules: every AttnProcessor2_0 feature one at a time, and
`attn.scale`, which AttnProcessor2_0 ignores but diffusers' classic AttnProcessor honours."""

import subprocess
import sys

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

import mfa_hf
from mfa_hf import trace
from mfa_hf.integrations import diffusers as mfa_diffusers
from mfa_hf.integrations.diffusers import MFAProcessor, enable

CHANNELS, CONTEXT_DIM = 32, 12  # 32: SpatialNorm normalizes in 32 groups

FEATURES = {
    "self": dict(),
    "cross": dict(cross_attention_dim=CONTEXT_DIM),
    "cross_norm_cross_layer": dict(cross_attention_dim=CONTEXT_DIM, cross_attention_norm="layer_norm"),
    "cross_norm_cross_group": dict(cross_attention_dim=CONTEXT_DIM, cross_attention_norm="group_norm",
                                   cross_attention_norm_num_groups=4),
    "qk_layer_norm": dict(qk_norm="layer_norm"),
    "group_norm_residual_rescale": dict(norm_num_groups=4, residual_connection=True, rescale_output_factor=2.0),
    "spatial_norm": dict(spatial_norm_dim=4, residual_connection=True),
}


def _module(features: dict, seed: int = 0, **overrides) -> Attention:
    torch.manual_seed(seed)
    return Attention(query_dim=CHANNELS, heads=2, dim_head=8, bias=True, **features, **overrides).eval()


def _inputs(name: str, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    image = name in ("group_norm_residual_rescale", "spatial_norm")
    hidden = torch.randn(2, CHANNELS, 4, 3, generator=generator) if image else torch.randn(2, 9, CHANNELS, generator=generator)
    kwargs = {}
    if name.startswith("cross"):
        kwargs["encoder_hidden_states"] = torch.randn(2, 5, CONTEXT_DIM, generator=generator)
    if name == "spatial_norm":
        kwargs["temb"] = torch.randn(2, 4, 2, 2, generator=generator)
    return hidden, kwargs


def _run(module, processor, hidden, **kwargs):
    module.set_processor(processor)
    with torch.no_grad(), trace.capture() as calls:
        out = module(hidden, **kwargs)
    return out, sum(trace.served_by(calls).values())


@pytest.mark.parametrize("name", list(FEATURES))
def test_each_attn_processor2_0_feature(name):
    module = _module(FEATURES[name])
    hidden, kwargs = _inputs(name)
    expected, default_calls = _run(module, AttnProcessor2_0(), hidden, **kwargs)
    actual, calls = _run(module, MFAProcessor(), hidden, **kwargs)
    assert (default_calls, calls) == (0, 1)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_kind", ["additive_2d", "additive_3d_per_query", "bool_2d"])
def test_masks_prepared_by_attention(mask_kind):
    module = _module(FEATURES["cross"])
    hidden, kwargs = _inputs("cross")
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 3:] = False
    masks = {
        "additive_2d": (~keep).float()[:, None, :] * -10000.0,  # (B, 1, Lk), as the UNet builds it
        "additive_3d_per_query": torch.randn(2, 9, 5),  # (B, Lq, Lk)
        "bool_2d": keep[:, None, :],
    }
    kwargs["attention_mask"] = masks[mask_kind]
    expected, _ = _run(module, AttnProcessor2_0(), hidden, **kwargs)
    actual, calls = _run(module, MFAProcessor(), hidden, **kwargs)
    assert calls == 1
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale_qk", [False, True])
def test_attn_scale_is_honoured(scale_qk):
    module = _module(FEATURES["cross"], scale_qk=scale_qk)
    hidden, kwargs = _inputs("cross")
    expected, _ = _run(module, AttnProcessor(), hidden, **kwargs)  # the classic processor uses attn.scale
    actual, calls = _run(module, MFAProcessor(), hidden, **kwargs)
    assert calls == 1
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    sdpa_default, _ = _run(module, AttnProcessor2_0(), hidden, **kwargs)
    assert torch.allclose(actual, sdpa_default, atol=1e-5) == scale_qk, "the scale must make a difference"


def test_enable_restores_the_original_processor_objects(tiny):
    unet, inputs = tiny.build("unet")
    originals = dict(unet.attn_processors)
    with enable(unet) as handle:
        assert handle.summary() == {"MFAProcessor": len(originals)}
        assert all(type(p) is MFAProcessor for p in unet.attn_processors.values())
    assert all(unet.attn_processors[name] is original for name, original in originals.items())
    _, calls = tiny.run_counting(unet, inputs)
    assert calls == 0


def test_public_names_and_a_light_import():
    assert mfa_hf.MFAProcessor is MFAProcessor
    assert mfa_hf.MFAJointAttnProcessor is mfa_diffusers.MFAJointAttnProcessor
    assert mfa_hf.MFACogVideoXAttnProcessor is mfa_diffusers.MFACogVideoXAttnProcessor
    probe = "import sys, mfa_hf; assert 'diffusers' not in sys.modules, 'import mfa_hf pulled in diffusers'"
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_enable_leaves_processors_pinned_to_another_backend_alone():
    """AnyFlow's causal processor builds a flex BlockMask and accepts only the flex backends (its class lists them);
    enable() gave it "mfa", even with strict=False and nothing skipped, and the first forward failed inside
    diffusers. Now it is skipped, named with the backends it takes, and the model's output is its default one."""
    diffusers = pytest.importorskip("diffusers")
    model_cls = getattr(diffusers, "AnyFlowFARTransformer3DModel", None)
    if model_cls is None:
        pytest.skip("this diffusers has no AnyFlowFARTransformer3DModel")
    torch.manual_seed(0)
    model = model_cls(patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4), full_chunk_limit=3, num_attention_heads=2,
                      attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32,
                      num_layers=2, cross_attn_norm=True, rope_max_seq_len=32, gate_value=0.25,
                      deltatime_type="r").eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 4, 16, 16, generator=g), timestep=torch.full((1, 4), 500.0),
                  r_timestep=torch.full((1, 4), 250.0), encoder_hidden_states=torch.randn(1, 12, 16, generator=g),
                  chunk_partition=[2, 2])
    with torch.no_grad():
        want = model(**inputs)[0]
    handle = enable(model)
    pinned = {name: why for name, why in handle.skipped.items() if "works only with the flex" in why}
    assert pinned, handle.skipped
    with torch.no_grad():
        got = model(**inputs)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(mfa_diffusers.ContractMismatch, match="works only with the flex"):
        enable(model_cls.from_config(model.config), strict=True)
    handle.restore()
