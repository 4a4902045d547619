"""Models whose processors we have no class for, but whose attention is F.scaled_dot_product_attention (AuraFlow,
HunyuanDiT, Stable Audio, Lumina 2, ...) or diffusers' dispatcher without a backend of its own (Cosmos): enable()
routes their SDPA calls to our kernels (routed.py). Sweeps of diffusers 0.42.1 found them left alone (in
handle.skipped: correct, but no kernel at all).

Each model: the default processors against enable() with MFA_BACKEND=torch (our torch backend computes, not
torch's own SDPA that the CPU route would pick), every routed module reaching our kernel, restore() giving back
the exact default output, strict=True accepting the model.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from mfa_hf import trace  # noqa: E402
from mfa_hf.integrations.diffusers import enable  # noqa: E402
from mfa_hf.integrations.diffusers import routed  # noqa: E402

BATCH = 2


def _inputs(generator, **shapes):
    return {name: torch.randn(*shape, generator=generator) for name, shape in shapes.items()}


def _auraflow(generator):
    model = diffusers.AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, out_channels=4, pos_embed_max_size=64)
    return model, dict(**_inputs(generator, hidden_states=(BATCH, 4, 8, 8), encoder_hidden_states=(BATCH, 7, 32)),
                       timestep=torch.tensor([10, 20]))


def _hunyuan_dit(generator):
    model = diffusers.HunyuanDiT2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4, hidden_size=16, text_len=4,
        text_len_t5=4, activation_fn="gelu-approximate")
    inputs = _inputs(generator, hidden_states=(BATCH, 4, 8, 8), encoder_hidden_states=(BATCH, 4, 8),
                     encoder_hidden_states_t5=(BATCH, 4, 8), image_meta_size=(BATCH, 6))
    return model, dict(inputs, text_embedding_mask=torch.ones(BATCH, 4), text_embedding_mask_t5=torch.ones(BATCH, 4),
                       timestep=torch.tensor([10.0, 20.0]), style=torch.zeros(BATCH, dtype=torch.long),
                       image_rotary_emb=[torch.ones(16, 8), torch.zeros(16, 8)])


def _stable_audio(generator):
    model = diffusers.StableAudioDiTModel(  # GQA: 2 KV heads
        sample_size=4, in_channels=3, num_layers=2, attention_head_dim=4, num_key_value_attention_heads=2,
        out_channels=3, cross_attention_dim=4, time_proj_dim=8, global_states_input_dim=8, cross_attention_input_dim=4)
    return model, dict(**_inputs(generator, hidden_states=(BATCH, 3, 8), encoder_hidden_states=(BATCH, 7, 4),
                                 global_hidden_states=(BATCH, 1, 8)), timestep=torch.tensor([10, 20]))


def _lumina2(generator):
    model = diffusers.Lumina2Transformer2DModel(  # GQA (1 KV head) and a caption padding mask
        sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
        num_attention_heads=3, num_kv_heads=1, multiple_of=2, ffn_dim_multiplier=None, norm_eps=1e-5,
        scaling_factor=1.0, axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128), cap_feat_dim=32)
    mask = torch.ones(BATCH, 16, dtype=torch.bool)
    mask[1, 11:] = False  # the second caption is 11 tokens
    return model, dict(**_inputs(generator, hidden_states=(BATCH, 4, 16, 16), encoder_hidden_states=(BATCH, 16, 32)),
                       timestep=torch.rand(BATCH, generator=generator), encoder_attention_mask=mask)


def _cosmos(generator):
    """Its processors call diffusers' dispatcher with no backend of their own (the active backend serves them).
    concat_padding_mask=False: the padding-mask path needs torchvision."""
    model = diffusers.CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False, extra_pos_embed_type="learnable")
    mask = torch.ones(BATCH, 12, dtype=torch.bool)
    mask[1, 8:] = False  # the second text is 8 tokens
    return model, dict(**_inputs(generator, hidden_states=(BATCH, 4, 1, 16, 16), encoder_hidden_states=(BATCH, 12, 16)),
                       timestep=torch.tensor([10, 20]), attention_mask=mask, fps=30)


def _cosmos_float_mask(generator):
    """The same with the 0/1 float mask of upstream's tests, which SDPA adds to the scores as it is."""
    model, inputs = _cosmos(generator)
    return model, dict(inputs, attention_mask=inputs["attention_mask"].float())


MODELS = {"auraflow": _auraflow, "hunyuan_dit": _hunyuan_dit, "stable_audio": _stable_audio, "lumina2": _lumina2,
          "cosmos": _cosmos, "cosmos_float_mask": _cosmos_float_mask}


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


@pytest.mark.parametrize("name", sorted(MODELS))
def test_enable_routes_their_sdpa_calls_to_our_kernels(monkeypatch, name):
    monkeypatch.setenv("MFA_BACKEND", "torch")
    torch.manual_seed(0)
    model, inputs = MODELS[name](torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad(), trace.capture() as default_calls:
        expected = _first(model(**inputs))
    assert sum(trace.served_by(default_calls).values()) == 0
    handle = enable(model, strict=True)
    routed_modules = [module for module in model.modules() if routed.is_routed(getattr(module, "processor", None))]
    assert routed_modules and not handle.skipped
    with torch.no_grad(), trace.capture() as calls, trace.capture_fallbacks() as fell:
        actual = _first(model(**inputs))
    assert sum(trace.served_by(calls).values()) >= len(routed_modules), dict(trace.served_by(calls))
    assert not fell, f"calls left to stock SDPA: {dict(fell)}"
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
    handle.restore()
    assert not any(routed.is_routed(getattr(m, "processor", None)) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(_first(model(**inputs)), expected)


def test_a_routed_processor_keeps_its_class_attributes_and_signature():
    from diffusers.models.attention_processor import AuraFlowAttnProcessor2_0

    upstream = AuraFlowAttnProcessor2_0()
    upstream.marker = "kept"
    copy = routed.routed(upstream)
    assert isinstance(copy, AuraFlowAttnProcessor2_0) and copy.marker == "kept"
    # diffusers hands a processor only the keyword arguments its __call__ signature names
    assert inspect.signature(copy.__call__).parameters.keys() == inspect.signature(upstream.__call__).parameters.keys()
    assert type(routed.routed(AuraFlowAttnProcessor2_0())) is type(copy)  # one routed class per upstream class


def test_what_is_not_routed():
    """Processors that never call SDPA by attribute (sliced, xformers, the pre-2.0 IP-Adapter's baddbmm) and routed
    ones: enable() lists them in handle.skipped. Torch-module processors that call SDPA are routed."""
    from diffusers.models import attention_processor as upstream

    assert not routed.routable(upstream.SlicedAttnProcessor(slice_size=2))
    assert not routed.routable(upstream.IPAdapterAttnProcessor(hidden_size=8, cross_attention_dim=8))
    assert not routed.routable(routed.routed(upstream.AuraFlowAttnProcessor2_0()))
    assert routed.routable(upstream.AuraFlowAttnProcessor2_0())
    assert routed.routable(upstream.IPAdapterAttnProcessor2_0(hidden_size=8, cross_attention_dim=8))


def test_a_routed_processor_shares_the_upstream_state():
    """One attribute dict under two classes: what is set on either is the other's, and a module processor's weights
    are the same Parameters (restore() gives back an object that is not out of date)."""
    from diffusers.models import attention_processor as upstream

    plain = upstream.AuraFlowAttnProcessor2_0()
    view = routed.routed(plain)
    view.marker = "set while routed"
    assert plain.marker == "set while routed"
    module = upstream.IPAdapterAttnProcessor2_0(hidden_size=8, cross_attention_dim=8, num_tokens=(4, 2))
    view = routed.routed(module)
    assert isinstance(view, torch.nn.Module) and view.to_k_ip[1].weight is module.to_k_ip[1].weight
    assert list(view.state_dict()) == list(module.state_dict())
    view.scale = [0.3, 0.4]
    assert module.scale == [0.3, 0.4]


def _unet_with_ip_adapter(scale):
    """A tiny UNet whose cross-attention layers carry IP-Adapter processors (random weights, set through the public
    set_attn_processor, with the image projection the adapter's loader would add): one image, 4 image tokens."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8).eval()
    processors = {}
    for name, module in unet.named_modules():
        if name.endswith("attn1"):
            processors[f"{name}.processor"] = AttnProcessor2_0()
        elif name.endswith("attn2"):
            processor = IPAdapterAttnProcessor2_0(hidden_size=module.inner_dim, cross_attention_dim=24, scale=scale)
            for linear in (*processor.to_k_ip, *processor.to_v_ip):
                torch.nn.init.normal_(linear.weight, std=0.2)  # the image tokens must move the output
            processors[f"{name}.processor"] = processor
    unet.set_attn_processor(processors)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection(
        [ImageProjection(image_embed_dim=12, cross_attention_dim=24, num_image_text_embeds=4)])
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    return unet


def _ip_adapter_inputs():
    """The tiny IP-Adapter UNet's inputs: latents, 7 text tokens, one image's embedding."""
    generator = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(BATCH, 4, 8, 8, generator=generator), timestep=torch.tensor([10, 20]),
                encoder_hidden_states=torch.randn(BATCH, 7, 24, generator=generator),
                added_cond_kwargs={"image_embeds": [torch.randn(BATCH, 1, 12, generator=generator)]})


@pytest.mark.parametrize("masks", ["none", "text mask", "ip_adapter_masks"])
def test_ip_adapter_processors_are_routed(monkeypatch, masks):
    """IP-Adapter's processor (a torch module holding the image-token projections) calls SDPA twice a layer, the
    text attention (with the text mask, if any) and the image tokens': both reach our kernel, the output equals the
    default processors', the state dict keeps its keys, and a scale set while enabled (set_ip_adapter_scale's way:
    on the processors unet.attn_processors lists) holds after restore()."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    monkeypatch.setenv("MFA_BACKEND", "torch")
    unet = _unet_with_ip_adapter(scale=0.7)
    inputs = _ip_adapter_inputs()
    if masks == "text mask":
        inputs["encoder_attention_mask"] = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    elif masks == "ip_adapter_masks":  # the image prompt acts on the left half of the picture only
        region = torch.zeros(1, 1, 8, 8)
        region[..., :4] = 1
        inputs["cross_attention_kwargs"] = {"ip_adapter_masks": [region]}
    keys = list(unet.state_dict())
    with torch.no_grad():
        expected = unet(**inputs).sample
    adapters = [m for m in unet.modules() if isinstance(getattr(m, "processor", None), IPAdapterAttnProcessor2_0)]
    handle = enable(unet, strict=True)
    assert not handle.skipped and list(unet.state_dict()) == keys
    assert all(routed.is_routed(m.processor) for m in adapters)
    with torch.no_grad(), trace.capture() as calls, trace.capture_fallbacks() as fell:
        actual = unet(**inputs).sample
    assert sum(trace.served_by(calls).values()) >= 2 * len(adapters), dict(trace.served_by(calls))
    assert not fell, f"calls left to stock SDPA: {dict(fell)}"
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)

    for processor in unet.attn_processors.values():  # what pipe.set_ip_adapter_scale(0.2) does
        if isinstance(processor, IPAdapterAttnProcessor2_0):
            processor.scale = [0.2]
    with torch.no_grad():
        rescaled = unet(**inputs).sample
    assert not torch.allclose(rescaled, actual, atol=1e-4)  # the scale matters here
    handle.restore()
    assert all(type(m.processor) is IPAdapterAttnProcessor2_0 and m.processor.scale == [0.2] for m in adapters)
    with torch.no_grad():
        torch.testing.assert_close(unet(**inputs).sample, rescaled, atol=2e-5, rtol=1e-4)


def test_a_routed_model_compiles_with_fullgraph():
    """Under torch.compile the upstream processor runs as it is (the patch swaps a module attribute, which a traced
    graph cannot): no graph break, the default output."""
    torch.manual_seed(0)
    model, inputs = _auraflow(torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        expected = _first(model(**inputs))
    handle = enable(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(_first(compiled(**inputs)), expected, atol=2e-5, rtol=1e-4)
    handle.restore()


def test_custom_diffusion_processors_are_routed(monkeypatch):
    """Custom Diffusion's processor (a torch module with its own K/V and output projections) on a cross-attention
    module: routed, equal to the default, the same weights. (No mask: upstream's processor hands SDPA the mask in
    the (B * heads, 1, keys) layout of the pre-2.0 processors, which SDPA cannot broadcast.)"""
    from diffusers.models.attention_processor import Attention, CustomDiffusionAttnProcessor2_0

    monkeypatch.setenv("MFA_BACKEND", "torch")
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.attn = Attention(query_dim=16, cross_attention_dim=12, heads=4, dim_head=4).eval()
    processor = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=True, hidden_size=16, cross_attention_dim=12)
    holder.attn.set_processor(processor)
    generator = torch.Generator().manual_seed(1)
    hidden, text = torch.randn(BATCH, 9, 16, generator=generator), torch.randn(BATCH, 5, 12, generator=generator)
    with torch.no_grad():
        expected = holder.attn(hidden, encoder_hidden_states=text)
    handle = enable(holder, strict=True)
    assert routed.is_routed(holder.attn.processor) and holder.attn.processor.to_k_custom_diffusion is \
        processor.to_k_custom_diffusion
    with torch.no_grad(), trace.capture() as calls, trace.capture_fallbacks() as fell:
        actual = holder.attn(hidden, encoder_hidden_states=text)
    assert sum(trace.served_by(calls).values()) == 1 and not fell, (dict(trace.served_by(calls)), dict(fell))
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
    handle.restore()
    assert holder.attn.processor is processor


def _save_and_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_a_routed_model_saves_whole_and_copies(monkeypatch, how):
    """Routed classes are made at run time, so pickle cannot name them: a whole model saved while enabled (or deep
    copied, or sent to a spawned worker) comes back with its processors routed again over their own state, a
    module processor's weights included, and the same output served by our kernels."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    monkeypatch.setenv("MFA_BACKEND", "torch")
    unet = _unet_with_ip_adapter(scale=0.7)
    inputs = _ip_adapter_inputs()
    enable(unet, strict=True)
    with torch.no_grad():
        expected = unet(**inputs).sample
    twin = _save_and_load(unet) if how == "torch.save" else copy.deepcopy(unet)
    adapters = [m.processor for m in twin.modules() if isinstance(getattr(m, "processor", None),
                                                                  IPAdapterAttnProcessor2_0)]
    assert adapters and all(routed.is_routed(p) for p in adapters)
    assert twin.state_dict().keys() == unet.state_dict().keys()
    with torch.no_grad(), trace.capture() as calls, trace.capture_fallbacks() as fell:
        actual = twin(**inputs).sample
    assert sum(trace.served_by(calls).values()) >= 2 * len(adapters) and not fell
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    adapters[0].scale = [0.1]  # the twin's state is its own
    assert all(m.processor.scale == [0.7] for m in unet.modules()
               if isinstance(getattr(m, "processor", None), IPAdapterAttnProcessor2_0))
    plain = routed.routed(diffusers.models.attention_processor.AuraFlowAttnProcessor2_0())  # no state at all
    assert routed.is_routed(pickle.loads(pickle.dumps(plain)))


def test_sd3_ip_adapter_processors_are_routed(monkeypatch):
    """SD3's IP-Adapter processor (a torch module: joint attention, then the image tokens' attention, with the time
    projection the loader adds as image_proj): both SDPA calls of each layer reach our kernel, the output equals the
    default processors' and the image tokens matter in it."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    monkeypatch.setenv("MFA_BACKEND", "torch")
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16).eval()
    model.set_attn_processor({name: SD3IPAdapterJointAttnProcessor2_0(
        hidden_size=16, ip_hidden_states_dim=16, head_dim=8, timesteps_emb_dim=32, scale=0.7)
        for name in model.attn_processors})
    model.image_proj = IPAdapterTimeImageProjection(embed_dim=12, output_dim=16, hidden_dim=32, depth=1, dim_head=8,
                                                    heads=4, num_queries=4, ffn_ratio=2, timestep_in_dim=16)

    def inputs(image=True):  # fresh each call: the model pops the image embeddings out of joint_attention_kwargs
        generator = torch.Generator().manual_seed(1)
        tensors = _inputs(generator, hidden_states=(BATCH, 4, 8, 8), encoder_hidden_states=(BATCH, 5, 16),
                          pooled_projections=(BATCH, 8), image=(BATCH, 3, 12))
        embeds = tensors.pop("image")
        kwargs = {"ip_adapter_image_embeds": embeds} if image else None
        return dict(tensors, timestep=torch.tensor([10, 20]), joint_attention_kwargs=kwargs)

    with torch.no_grad():
        expected = model(**inputs()).sample
        assert not torch.allclose(model(**inputs(image=False)).sample, expected, atol=1e-3)
    handle = enable(model, strict=True)
    layers = [p for p in model.attn_processors.values() if isinstance(p, SD3IPAdapterJointAttnProcessor2_0)]
    assert len(layers) == 2 and all(routed.is_routed(p) for p in layers) and not handle.skipped
    with torch.no_grad(), trace.capture() as calls, trace.capture_fallbacks() as fell:
        actual = model(**inputs()).sample
    assert sum(trace.served_by(calls).values()) == 2 * len(layers) and not fell, (dict(trace.served_by(calls)), fell)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
    handle.restore()
    assert all(type(block.attn.processor) is SD3IPAdapterJointAttnProcessor2_0 for block in model.transformer_blocks)
