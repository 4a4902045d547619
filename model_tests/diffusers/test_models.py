"""Every tiny model, default processors vs enable(): same weights, same inputs, same output.

What each case exercises (see conftest.py for the configs):
  unet       self- and cross-attention (Lk = 7), additive padding mask via encoder_attention_mask
  vae        the 4-D (B, C, H, W) path: group_norm, residual connection, rescale_output_factor
  pixart     cross-attention with a padding mask (prepare_attention_mask)
  sd3        joint attention (image + context sequence), context_pre_only last block
  sd35       joint attention with RMS qk-norm (also on the context) and a dual (image-only) attn2
  cogvideox  text + video joint sequence with RoPE on the video tokens
  flux       dispatcher backend, RoPE, double- and single-stream blocks
  wan        dispatcher backend, self- and cross-attention
  ltx        dispatcher backend, additive float mask on cross-attention
  qwenimage  dispatcher backend, bool joint mask
  dit        no set_attn_processor on the model: enable() walks the modules
"""

import pytest
import torch

ALL_MODELS = ["unet", "vae", "pixart", "sd3", "sd35", "cogvideox", "flux", "wan", "ltx", "qwenimage", "dit"]
LOW_PRECISION_MODELS = ["unet", "vae", "sd35", "cogvideox", "flux", "ltx", "qwenimage"]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_fp32_matches_default_processors(tiny, name):
    tiny.assert_runs_like_default(name)


@pytest.mark.parametrize("name", LOW_PRECISION_MODELS)
def test_bf16_within_design_rule(tiny, name):
    tiny.assert_low_precision_rule(name, torch.bfloat16)
