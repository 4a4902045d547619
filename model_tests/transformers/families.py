"""Tiny configs per family (Liger-style): 2 layers, hidden 64, 4 query / 2 KV heads, vocab 128.

Each entry builds a *fresh* config per call (a shared config object would switch the reference
model's attention implementation too). `kind` says which comparison applies:
- "causal_lm": padded forward + dynamic/static greedy generate;
- "encoder": padded forward (bidirectional);
- "seq2seq": encoder padding + decoder with cross-attention, dynamic greedy generate;
- "vision": pixel_values forward.
Feature each family exercises is in the comment next to it (cf. hf-contract.md §4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import transformers as tf

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Family:
    name: str
    model_cls: Callable
    config: Callable[[], object]
    kind: str = "causal_lm"
    static_cache: bool = True


def _decoder(cfg_cls, **extra):
    return lambda: cfg_cls(**{**SMALL, **extra})


def _gpt2():
    return tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, **IDS)


def _opt():
    return tf.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=0)


def _deepseek_v3():
    return tf.DeepseekV3Config(**{**SMALL, "num_key_value_heads": 4}, kv_lora_rank=16, q_lora_rank=32,
                               qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=4,
                               num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=32,
                               first_k_dense_replace=1)


def _gpt_oss():
    return tf.GptOssConfig(**{**SMALL, "intermediate_size": 64}, head_dim=16, num_local_experts=4,
                           num_experts_per_tok=2, sliding_window=4, layer_types=["sliding_attention", "full_attention"])


def _whisper():
    return tf.WhisperConfig(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                            max_source_positions=16, max_target_positions=64, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None,
                            suppress_tokens=None)


def _t5():
    return tf.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                       relative_attention_num_buckets=8, pad_token_id=0, decoder_start_token_id=0, eos_token_id=1)


def _bert():
    return tf.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=256, pad_token_id=0)


def _modernbert():
    return tf.ModernBertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=256, cls_token_id=1, sep_token_id=2, **IDS,
                               global_attn_every_n_layers=2, local_attention=6)


def _clip():
    return tf.CLIPConfig(
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, **IDS),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8), projection_dim=32)


def _vit():
    return tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        image_size=32, patch_size=8)


FAMILIES = [
    Family("llama", tf.LlamaForCausalLM, _decoder(tf.LlamaConfig)),  # GQA baseline
    Family("mistral", tf.MistralForCausalLM, _decoder(tf.MistralConfig, sliding_window=4)),  # window, every layer
    Family("qwen2", tf.Qwen2ForCausalLM, _decoder(tf.Qwen2Config, use_sliding_window=True, sliding_window=4,
                                                  max_window_layers=1)),  # per-layer window
    Family("qwen3", tf.Qwen3ForCausalLM, _decoder(tf.Qwen3Config, head_dim=24)),  # qk-norm, explicit head_dim
    Family("gemma2", tf.Gemma2ForCausalLM, _decoder(tf.Gemma2Config, head_dim=16, sliding_window=4,
                                                    attn_logit_softcapping=2.0)),  # softcap, alternating
    Family("gemma3", tf.Gemma3ForCausalLM, _decoder(tf.Gemma3TextConfig, head_dim=16, sliding_window=4,
                                                    query_pre_attn_scalar=8)),  # custom scaling
    Family("gpt_oss", tf.GptOssForCausalLM, _gpt_oss),  # sinks, sliding, MoE
    Family("deepseek_v3", tf.DeepseekV3ForCausalLM, _deepseek_v3),  # MLA: D_v != D_qk
    Family("phi3", tf.Phi3ForCausalLM, _decoder(tf.Phi3Config, sliding_window=4)),  # fused qkv
    Family("mixtral", tf.MixtralForCausalLM, _decoder(tf.MixtralConfig, num_local_experts=4,
                                                      num_experts_per_tok=2)),  # MoE
    Family("gpt2", tf.GPT2LMHeadModel, _gpt2),  # MHA, Conv1D, no num_key_value_groups
    Family("opt", tf.OPTForCausalLM, _opt),  # scaling=1.0 with pre-scaled q
    Family("whisper", tf.WhisperForConditionalGeneration, _whisper, kind="seq2seq"),  # cross-attention
    Family("t5", tf.T5ForConditionalGeneration, _t5, kind="seq2seq"),  # position_bias
    Family("bert", tf.BertModel, _bert, kind="encoder"),
    Family("modernbert", tf.ModernBertModel, _modernbert, kind="encoder"),  # bidirectional window
    Family("clip", tf.CLIPModel, _clip, kind="clip"),  # is_causal kwarg (text), vision tower
    Family("vit", tf.ViTModel, _vit, kind="vision"),  # mask None, layer_idx None
]
BY_NAME = {f.name: f for f in FAMILIES}
DECODERS = [f for f in FAMILIES if f.kind == "causal_lm"]
