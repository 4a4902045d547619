"""Context parallelism over torch.distributed: one attention call whose sequence is split across ranks.

- ring_flash_attn_func: ring attention (K/V travel around the ring; exact LSE merge; causal balanced
  by zig-zag; windows stop the ring early; backward through the ring).
- ulysses_flash_attn_func: all-to-all attention (sequence split <-> head split around one local call).

- ring_flash_attn_varlen_func, ulysses_flash_attn_varlen_func: the same over packed sequences (T, H, D),
  each rank its contiguous shard of the stream, cu_seqlens of the whole packing.

All take FlashAttention's layouts with each rank's contiguous shard. docs/context_parallel.md.
"""

from .functions import ring_flash_attn_func, ulysses_flash_attn_func
from .varlen import ring_flash_attn_varlen_func, ulysses_flash_attn_varlen_func

__all__ = ["ring_flash_attn_func", "ring_flash_attn_varlen_func", "ulysses_flash_attn_func",
           "ulysses_flash_attn_varlen_func"]
