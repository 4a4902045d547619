"""Attention processors for the diffusers models that call SDPA inside their processor.

Each class serves one upstream contract, reproduces its projection and norm steps, and replaces only
the `F.scaled_dot_product_attention` call with our kernel:

    MFAProcessor               AttnProcessor2_0 / AttnProcessor (UNet, VAE, PixArt, DiT, ...)
    MFAJointAttnProcessor      JointAttnProcessor2_0 (SD3, SD3.5 incl. dual attention and qk-norm)
    MFACogVideoXAttnProcessor  CogVideoXAttnProcessor2_0 (CogVideoX, text + video joint sequence)

All three use `attn.scale` as the softmax scale (the upstream *2_0 processors ignore it and use
1/sqrt(head_dim); the two agree unless a module was built with scale_qk=False, where ours follows
the module, as diffusers' classic AttnProcessor does).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .attend import attend_bhsd
from .contracts import ContractMismatch, require_legacy_attention, require_no_added_kv, require_plain_io


def _split_heads(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """(B, S, H * D) -> (B, H, S, D) view, the layout norms and RoPE expect upstream."""
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, S, H * D); free for the kernel's output (a transposed BSHD tensor)."""
    batch, heads, seq, dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq, heads * dim)


def _projected_qkv(attn: nn.Module, x: torch.Tensor, projections, norm_q, norm_k):
    """Q, K, V of x as (B, H, S, D), with the optional q/k norms (qk-norm) applied per head."""
    query, key, value = (_split_heads(proj(x), x.shape[0], attn.heads) for proj in projections)
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


def _project_out(attn: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return attn.to_out[1](attn.to_out[0](hidden_states))  # linear, then dropout


class MFAProcessor:
    """Our kernel under diffusers' `AttnProcessor2_0` contract (UNet, VAE, PixArt, DiT...).

    Covers self- and cross-attention, 4-D (B, C, H, W) inputs, spatial_norm, group_norm, masks
    prepared by `attn.prepare_attention_mask` (additive or bool), norm_cross, norm_q/norm_k, the
    residual connection, rescale_output_factor, and `attn.scale`.

        pipe.unet.set_attn_processor(MFAProcessor())
        pipe.vae.set_attn_processor(MFAProcessor())
    """

    serves = "the AttnProcessor2_0 contract"

    def check(self, attn: nn.Module) -> None:
        """Raise ContractMismatch unless `attn` is a module this processor computes faithfully."""
        require_legacy_attention(type(self).__name__, attn, self.serves)
        require_no_added_kv(type(self).__name__, attn, self.serves,
                            "MFAJointAttnProcessor for SD3-style joint attention")

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, image_rotary_emb=None, **kwargs) -> torch.Tensor:
        # `image_rotary_emb` is declared only to refuse it: AttnProcessor2_0 would drop it silently,
        # which is how a RoPE model (CogVideoX) ends up with wrong output instead of an error.
        self.check(attn)
        if image_rotary_emb is not None:
            raise ContractMismatch(f"{type(self).__name__}: expected no image_rotary_emb ({self.serves} has no "
                                   f"RoPE), got one; use MFACogVideoXAttnProcessor or enable(model)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:  # (B, C, H, W) -> (B, H*W, C)
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        hidden_states = self._attend(attn, hidden_states, encoder_hidden_states, attention_mask)
        if image_shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attend(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, context_len = context.shape[0], context.shape[1]
        mask = self._mask(attn, attention_mask, context_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = (_split_heads(t, batch, attn.heads) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = _merge_heads(attend_bhsd(query, key, value, mask, scale=attn.scale)).to(query.dtype)
        return _project_out(attn, out)

    @staticmethod
    def _mask(attn, attention_mask, context_len: int, batch: int):
        """diffusers' mask preparation: (B, Lk) or (B, 1|Lq, Lk) -> (B, heads, 1|Lq, Lk)."""
        if attention_mask is None:
            return None
        mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
        return mask.view(batch, attn.heads, -1, mask.shape[-1])


class MFAJointAttnProcessor:
    """Our kernel under diffusers' `JointAttnProcessor2_0` contract (SD3 / SD3.5).

    Image and context tokens are projected separately (with qk-norm when configured), attended
    jointly as one sequence, and split back: returns (hidden, context) when a context is given,
    else hidden alone (SD3.5's second, image-only `attn2`). Like upstream, no mask is applied.
    """

    serves = "the JointAttnProcessor2_0 contract"

    def check(self, attn: nn.Module) -> None:
        require_legacy_attention(type(self).__name__, attn, self.serves)
        require_plain_io(type(self).__name__, attn, self.serves)

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        self.check(attn)
        if attention_mask is not None:
            warnings.warn("MFAJointAttnProcessor: attention_mask is ignored, as JointAttnProcessor2_0 "
                          "ignores it", stacklevel=2)
        image_len = hidden_states.shape[1]
        query, key, value = self._image_qkv(attn, hidden_states)
        if encoder_hidden_states is not None:
            context_q, context_k, context_v = self._context_qkv(attn, encoder_hidden_states)
            query = torch.cat([query, context_q], dim=2)
            key = torch.cat([key, context_k], dim=2)
            value = torch.cat([value, context_v], dim=2)
        out = _merge_heads(attend_bhsd(query, key, value, scale=attn.scale)).to(query.dtype)
        hidden_out = _project_out(attn, out[:, :image_len])
        if encoder_hidden_states is None:
            return hidden_out
        context_out = out[:, image_len:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        return hidden_out, context_out

    @staticmethod
    def _image_qkv(attn, hidden_states):
        return _projected_qkv(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v), attn.norm_q, attn.norm_k)

    def _context_qkv(self, attn, context):
        if getattr(attn, "add_q_proj", None) is None:
            raise ContractMismatch(f"{type(self).__name__}: expected an Attention with added projections "
                                   f"(add_q_proj) when encoder_hidden_states is given, got one without; "
                                   f"use MFAProcessor for plain cross-attention")
        return _projected_qkv(attn, context, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                              attn.norm_added_q, attn.norm_added_k)


class MFACogVideoXAttnProcessor:
    """Our kernel under diffusers' `CogVideoXAttnProcessor2_0` contract.

    Text and video tokens form one sequence (text first), with qk-norm and RoPE on the video part;
    returns (hidden, encoder_hidden) like upstream.
    """

    serves = "the CogVideoXAttnProcessor2_0 contract"

    def check(self, attn: nn.Module) -> None:
        require_legacy_attention(type(self).__name__, attn, self.serves)
        require_no_added_kv(type(self).__name__, attn, self.serves, "MFAJointAttnProcessor")
        require_plain_io(type(self).__name__, attn, self.serves)

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        self.check(attn)
        text_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, seq_len = hidden_states.shape[0], hidden_states.shape[1]
        mask = MFAProcessor._mask(attn, attention_mask, seq_len, batch)
        query, key, value = (_split_heads(proj(hidden_states), batch, attn.heads)
                             for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # RoPE on the video tokens only (built out of place)
            video_q = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            query = torch.cat([query[:, :, :text_len], video_q], dim=2)
            if not attn.is_cross_attention:
                video_k = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)
                key = torch.cat([key[:, :, :text_len], video_k], dim=2)
        out = _project_out(attn, _merge_heads(attend_bhsd(query, key, value, mask, scale=attn.scale)))
        encoder_out, hidden_out = out.split([text_len, seq_len - text_len], dim=1)
        return hidden_out, encoder_out
