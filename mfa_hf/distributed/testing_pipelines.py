"""Worker tasks for the Diffusers pipeline context-parallel tests: a tiny FluxPipeline and a tiny
WanPipeline built from configs (no hub: no tokenizers or text encoders; they are registered as None and
the prompt embeddings are passed in), run for a few steps single-process and then under
`pipe.transformer.enable_parallelism(config=ContextParallelConfig(...))`, both after `enable(pipe)`.
Every rank draws the same weights, embeddings and noise (the same seeds).
"""

from __future__ import annotations

import torch

from .testing import Context
from .testing_diffusers import Counted, cpu_only_accelerator_count

STEPS = 2


def build_flux():
    """A tiny FluxPipeline (one-level AutoencoderKL, so 16 x 16 pixels are 8 x 8 = 64 image tokens) and
    its call arguments."""
    import diffusers

    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=4, shift_factor=0.0, scaling_factor=1.0)
    pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    g = torch.Generator().manual_seed(1)
    call = dict(prompt_embeds=torch.randn(1, 8, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 16, generator=g),
                height=16, width=16, guidance_scale=1.0)
    return pipe, call


def build_wan():
    """A tiny WanPipeline (tiny AutoencoderKLWan: 5 frames of 64 x 64 pixels are 2 x 8 x 8 latents, 32
    tokens after the (1, 2, 2) patches) and its call arguments; guidance 1 (no negative prompt)."""
    import diffusers

    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                     latents_std=[1.0] * 4)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)
    g = torch.Generator().manual_seed(1)
    call = dict(prompt_embeds=torch.randn(1, 8, 16, generator=g), height=64, width=64, num_frames=5,
                guidance_scale=1.0)
    return pipe, call


BUILDERS = {"flux": build_flux, "wan": build_wan}


def run_pipeline(context: Context, payload: tuple):
    """Every rank: (single-process latents, context-parallel latents, calls of our CP entry points) of
    pipeline `name` under `config`, both with enable(pipe)."""
    from diffusers import ContextParallelConfig

    from mfa_hf.integrations.diffusers import enable

    name, config = payload
    cpu_only_accelerator_count()
    counted = Counted()
    pipe, call = BUILDERS[name]()
    pipe.set_progress_bar_config(disable=True)
    enable(pipe)

    def generate():
        generator = torch.Generator().manual_seed(2)
        return pipe(**call, num_inference_steps=STEPS, generator=generator, output_type="latent",
                    return_dict=False)[0]

    with torch.no_grad():
        single = generate()
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(**config))
        parallel = generate()
    return single, parallel, counted.calls
