"""mfa-hf: flash attention for PyTorch on Apple Silicon, inside Hugging Face Transformers and Diffusers.

    import mfa_hf
    out = mfa_hf.flash_attn_func(q, k, v, causal=True)          # (B, S, H, D)
    out = mfa_hf.flash_attention(q, k, v, is_causal=True)       # (B, H, S, D)
"""

from . import dispatch, trace
from .api import flash_attention, flash_attention_chunked, flash_attn_func, flash_attn_varlen_func
from .dispatch import BackendUnavailable
from .problem import AttentionProblem

__version__ = "0.1.0"

dispatch.load_all()

__all__ = [
    "AttentionProblem",
    "BackendUnavailable",
    "flash_attention",
    "flash_attention_chunked",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "trace",
]
