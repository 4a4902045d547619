"""Diffusers modules without a processor whose own forward calls F.scaled_dot_product_attention (the Wan and
QwenImage VAEs' attention blocks, ...), and attention modules whose processor calls it but that have no
set_processor (Mochi, the Cosmos VAE): enable() routes their SDPA calls to our kernels with two forward hooks
(routed_modules.py). A sweep of diffusers 0.42.1's classes found them served by stock SDPA only.

Each model: default against enable() with MFA_BACKEND=torch (our torch backend computes, not the CPU route's
torch SDPA), every call served by our kernel, restore() giving back the exact default output; the patch is closed
after an exception inside forward; copies and saved models stay routed; a user's own module is left alone.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

from mfa_hf import trace  # noqa: E402
from mfa_hf.integrations.diffusers import enable  # noqa: E402
from mfa_hf.integrations.diffusers import routed_modules  # noqa: E402


def _wan_vae():
    model = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                       temperal_downsample=[False, True, True])
    return model, dict(sample=torch.randn(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)))


def _qwenimage_vae():
    model = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                             temperal_downsample=[False, True, True])
    return model, dict(sample=torch.randn(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(2)))


def _cosmos_vae():
    """Its attention modules hold processors that call SDPA, but have no set_processor: routed by hooks."""
    model = diffusers.AutoencoderKLCosmos(
        in_channels=3, out_channels=3, latent_channels=4, encoder_block_out_channels=(8, 8, 8, 8),
        decode_block_out_channels=(8, 8, 8, 8), attention_resolutions=(8,), resolution=64, num_layers=2, patch_size=4,
        patch_type="haar", scaling_factor=1.0, spatial_compression_ratio=4, temporal_compression_ratio=4)
    return model, dict(sample=torch.randn(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(3)))


def _mochi():
    """Mochi's attention (a processor, no set_processor), with a text padding mask."""
    model = diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=16)
    generator = torch.Generator().manual_seed(4)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False
    return model, dict(hidden_states=torch.randn(2, 4, 2, 16, 16, generator=generator),
                       encoder_hidden_states=torch.randn(2, 16, 16, generator=generator),
                       timestep=torch.tensor([10, 20]), encoder_attention_mask=mask)


MODELS = {"wan_vae": _wan_vae, "qwenimage_vae": _qwenimage_vae, "cosmos_vae": _cosmos_vae, "mochi": _mochi}


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result.sample


def _build(name):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    return model.eval(), inputs


def _routed(model) -> list:
    return [m for m in model.modules() if routed_modules.is_routed_module(m)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_enable_routes_their_own_sdpa_calls(monkeypatch, name):
    monkeypatch.setenv("MFA_BACKEND", "torch")
    model, inputs = _build(name)
    with torch.no_grad(), trace.capture() as default_calls:
        expected = _output(model(**inputs))
    assert sum(trace.served_by(default_calls).values()) == 0
    handle = enable(model, strict=True)  # nothing left in handle.skipped
    blocks = _routed(model)
    assert blocks and len(handle.modules) == len(blocks), handle.summary()
    assert any("its own SDPA calls routed" in kind for kind in handle.summary())
    with torch.no_grad(), trace.capture() as calls, trace.capture_fallbacks() as fell:
        actual = _output(model(**inputs))
    served = trace.served_by(calls)
    assert served[("torch", "fwd")] >= len(blocks), dict(served)
    assert not fell, f"calls left to stock SDPA: {dict(fell)}"
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
    handle.restore()
    assert not _routed(model)
    with torch.no_grad():
        assert torch.equal(_output(model(**inputs)), expected)


def test_an_exception_inside_forward_closes_the_patch(monkeypatch):
    monkeypatch.setenv("MFA_BACKEND", "torch")
    model, inputs = _build("wan_vae")
    enable(model)
    stock = F.scaled_dot_product_attention
    block = _routed(model)[0]

    def failing_forward(*args, **kwargs):
        assert F.scaled_dot_product_attention is not stock  # the patch is open inside
        raise RuntimeError("inside")

    monkeypatch.setattr(block, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="inside"), torch.no_grad():
        model(**inputs)
    assert F.scaled_dot_product_attention is stock
    assert not routed_modules._stack()


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copies_and_saved_models_stay_routed(monkeypatch, how):
    monkeypatch.setenv("MFA_BACKEND", "torch")
    model, inputs = _build("wan_vae")
    with torch.no_grad():
        expected = _output(model(**inputs))
    enable(model)
    if how == "deepcopy":
        again = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        again = torch.load(buffer, weights_only=False)
    assert len(_routed(again)) == len(_routed(model))
    with torch.no_grad(), trace.capture() as calls:
        actual = _output(again(**inputs))
    assert trace.served_by(calls)[("torch", "fwd")] > 0
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
    assert len(enable(again).modules) == 0, "an already routed module is not routed twice"


def test_a_users_own_module_is_left_alone(monkeypatch):
    class Mine(torch.nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q)

    holder = torch.nn.Sequential(Mine())
    handle = enable(holder)
    assert not handle.modules and not _routed(holder)


def test_a_routed_vae_compiles_with_fullgraph(monkeypatch):
    """Under torch.compile the hooks open nothing and the forward runs as traced (stock SDPA in the graph)."""
    model, _ = _build("wan_vae")
    enable(model)
    block = _routed(model)[0]
    x = torch.randn(1, block.dim, 1, 4, 4)
    with torch.no_grad():
        expected = block(x)
        compiled = torch.compile(block, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)
    assert not routed_modules._stack()


def _hunyuanvideo15_block():
    """`nn.functional.scaled_dot_product_attention(...)` (no F alias), a block-causal additive mask over frames."""
    from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import HunyuanVideo15AttnBlock

    return HunyuanVideo15AttnBlock(8)


def _vidtok_block():
    """The SDPA call is in the class's `attention` method, which forward calls."""
    from diffusers.models.autoencoders.autoencoder_vidtok import VidTokAttnBlock

    return VidTokAttnBlock(8)


@pytest.mark.parametrize("make", [_hunyuanvideo15_block, _vidtok_block], ids=lambda f: f.__name__.strip("_"))
def test_blocks_calling_sdpa_their_own_way_are_routed(monkeypatch, make):
    monkeypatch.setenv("MFA_BACKEND", "torch")
    torch.manual_seed(0)
    block = make().eval()
    x = torch.randn(1, 8, 3, 4, 4, generator=torch.Generator().manual_seed(5))  # HunyuanVideo 1.5: batch 1 only
    with torch.no_grad():
        expected = block(x)
    handle = enable(block, strict=True)
    assert [name for name, _, _ in handle.modules] == [""]
    with torch.no_grad(), trace.capture() as calls, trace.capture_fallbacks() as fell:
        actual = block(x)
    assert trace.served_by(calls)[("torch", "fwd")] == 1 and not fell, (dict(trace.served_by(calls)), dict(fell))
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
