"""Launching MLX's attention kernels under the emulator as MLX's host code does.

Grids, threadgroup sizes, buffer order, host names and the `AttnParams` layout follow
mlx/backend/metal/scaled_dot_product_attention.cpp (`sdpa_full_self_attention_metal`,
`sdpa_vector_2pass`); the kernels themselves come from the mlx-metal wheel's headers
(mlx_wheel.py), assembled by mlx_source.py. Tensors are (B, H, L, D), as MLX lays them out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .mlx_source import assemble

MLX_TYPE = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat16_t"}
STEEL_NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
STEEL_HEADERS = ["utils.h", "steel/attn/kernels/steel_attention.h"]
SDPA_VECTOR_HEADERS = ["utils.h", "sdpa_vector.h"]


@dataclass(frozen=True)
class SteelBlocks:
    """Block sizes of steel attention: MLX's host picks bq = 32, bk = 32 below D = 128 else 16,
    wm = 4, wn = 1 (`sdpa_full_self_attention_metal`, non-NAX path)."""

    bq: int
    bk: int
    wm: int = 4
    wn: int = 1

    @classmethod
    def mlx_default(cls, head_dim: int) -> "SteelBlocks":
        return cls(32, 32 if head_dim < 128 else 16)


def steel_attention_source(kernels_dir: Path, dtype: torch.dtype, head_dim: int, blocks: SteelBlocks,
                           aligned_q: bool, aligned_k: bool, causal: bool) -> tuple[str, str]:
    """(MSL source, kernel host name) of one steel attention instantiation, no mask or sinks."""
    constants = dict(align_Q=aligned_q, align_K=aligned_k, has_mask=False, do_causal=causal, has_sinks=False,
                     save_lse=False)
    t, n = MLX_TYPE[dtype], STEEL_NAME[dtype]
    name = (f"steel_attention_{n}_bq{blocks.bq}_bk{blocks.bk}_bd{head_dim}_bv{head_dim}_wm{blocks.wm}_wn{blocks.wn}"
            f"_mask{n}")
    kernel = (f'instantiate_kernel("{name}", attention, {t}, {blocks.bq}, {blocks.bk}, {head_dim}, {head_dim}, '
              f"{blocks.wm}, {blocks.wn}, {t}, float)")
    return assemble(kernels_dir, STEEL_HEADERS, constants, [kernel]), name


def attn_params(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, scale: float, bq: int,
                bk: int) -> torch.Tensor:
    """mlx::steel::AttnParams as bytes, laid out as in steel/attn/params.h (14 x 4 bytes, then 4 x int64[3])."""
    b, h, q_len, d = q.shape
    k_len = k.shape[2]
    nq, nk, nq_aligned, nk_aligned = -(-q_len // bq), -(-k_len // bk), q_len // bq, k_len // bk
    ints = [b, h, d, q_len, k_len, h // k.shape[1]]
    more = [nq, nk, nq_aligned, nk_aligned, q_len - nq_aligned * bq, k_len - nk_aligned * bk, k_len - q_len]
    strides = [s for t in (q, k, v, o) for s in t.stride()[:3]]
    raw = struct.pack("<6if7i12q", *ints, scale, *more, *strides)
    assert len(raw) == 152
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def steel_attention_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, scale: float,
                           blocks: SteelBlocks) -> tuple[list, dict]:
    """(arguments, launch keywords) of a steel attention dispatch: grid (NQ, H, B) of (32, wm, wn) threads."""
    b, h, q_len, _ = q.shape
    nq = -(-q_len // blocks.bq)
    args = [q, k, v, out, attn_params(q, k, v, out, scale, blocks.bq, blocks.bk)]
    return args, dict(threads=(nq * 32, h * blocks.wm, b * blocks.wn), group_size=(32, blocks.wm, blocks.wn))


def sdpa_vector_constants(blocks: int) -> dict:
    return dict(has_mask=False, query_transposed=False, do_causal=False, bool_mask=False, float_mask=False,
                has_sinks=False, blocks=blocks)


def sdpa_vector_2pass_source(kernels_dir: Path, dtype: torch.dtype, head_dim: int, blocks: int) -> tuple[str, str, str]:
    """(MSL source, pass-1 name, pass-2 name) of MLX's 2-pass decode for one type and head dim."""
    t = MLX_TYPE[dtype]
    first, second = f"sdpa_vector_2pass_1_{t}_{head_dim}_{head_dim}", f"sdpa_vector_2pass_2_{t}_{head_dim}"
    kernels = [f'instantiate_kernel("{first}", sdpa_vector_2pass_1, {t}, {head_dim}, {head_dim})',
               f'instantiate_kernel("{second}", sdpa_vector_2pass_2, {t}, {head_dim})']
    return assemble(kernels_dir, SDPA_VECTOR_HEADERS, sdpa_vector_constants(blocks), kernels), first, second


def kv_strides(k: torch.Tensor) -> list[int]:
    """MLX: the head stride is strides(0) when there is one KV head, else strides(1); then the row stride."""
    return [k.stride(0) if k.shape[1] == 1 else k.stride(1), k.stride(2)]


def sdpa_vector_2pass(lib, first: str, second: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float, blocks: int) -> torch.Tensor:
    """Both passes of MLX's 2-pass decode (no mask, no sinks); returns the output (B, H, Lq, D)."""
    b, h, q_len, d = q.shape
    gqa = h // k.shape[1]
    partials = torch.full((b, h, q_len, blocks, d), float("nan"), dtype=q.dtype)
    sums, maxs = (torch.full((b, h, q_len, blocks), float("nan")) for _ in range(2))
    unbound = torch.zeros(1, dtype=torch.uint8)  # buffer 6: the 2-pass kernel has none
    getattr(lib, first)(q, k, v, partials, sums, maxs, unbound, k.shape[2], *kv_strides(k), *kv_strides(v), scale,
                        threads=(k.shape[1] * 32, b * gqa, blocks * q_len), group_size=(32, gqa, q_len),
                        arg_casts={7: "int32"})
    out = torch.full_like(q, float("nan"))
    getattr(lib, second)(partials, sums, maxs, out, blocks, threads=(b * h * 1024, q_len, 1),
                         group_size=(1024, 1, 1), arg_casts={4: "int32"})
    return out
