"""End to end: a tiny Stable-Diffusion pipeline (UNet + VAE + CLIP text encoder + scheduler, all
from configs) runs 3 denoising steps with enable(pipe) and gives the default processors' image."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from mfa_hf import trace
from mfa_hf.integrations.diffusers import attention_modules, enable

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue"]
MAX_TOKENS = 8


def _tokenizer(folder) -> CLIPTokenizer:
    """A word-level CLIP tokenizer: whole words are vocabulary entries, so no merges are needed."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({f"{word}</w>": i + 2 for i, word in enumerate(WORDS)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)


def _pipeline(folder) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(WORDS) + 2, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(folder), unet=unet, scheduler=DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        result = pipe("a photo of a red cat", num_inference_steps=3, guidance_scale=5.0, height=16, width=16,
                      generator=generator, output_type="pt")
    return result.images


def test_three_steps_same_image_with_enable(tmp_path):
    pipe = _pipeline(tmp_path)
    backend_before = _AttentionBackendRegistry._active_backend
    with trace.capture() as default_calls:
        expected = _image(pipe)
    with enable(pipe) as handle, trace.capture() as our_calls:
        actual = _image(pipe)
    unet_modules = sum(1 for p in pipe.unet.attn_processors)
    decoder_modules = sum(1 for _ in attention_modules(pipe.vae.decoder))  # the encoder does not run
    assert handle.skipped == {}
    assert sum(trace.served_by(default_calls).values()) == 0
    # 3 steps x (CFG batched: one UNet call) x UNet modules + one VAE decode
    assert sum(trace.served_by(our_calls).values()) == 3 * unet_modules + decoder_modules
    assert expected.abs().max() > 0 and expected.std() > 1e-3, "the image must carry signal to compare"
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in pipe.unet.attn_processors.values())
    assert _AttentionBackendRegistry._active_backend is backend_before
