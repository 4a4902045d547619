"""`flash_attn.bert_padding` while the shim is enabled: move tokens between padded (B, S, ...) batches
and the packed (T, ...) layout that the varlen functions take.

Signatures and return tuples follow FlashAttention 2.8.3 (the API level the shim claims, what pip installs):
`unpad_input` takes `unused_mask` and returns 5 values, `seqused` last (2.7 added both; code written for 2.6
that unpacks four values fails with a clear ValueError from the unpacking, as with FA2 itself).
Written from the documented behaviour in plain torch ops, so autograd works through every function.
"""

from __future__ import annotations

import torch


def _check_first_axis(tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
        raise ValueError(f"{name}: expected a tensor with at least 2 dimensions (rows, ...), got {_describe(tensor)}")


def _check_indices(indices, name: str = "indices") -> None:
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.is_floating_point():
        raise ValueError(f"{name}: expected a 1-D integer tensor of row indices, got {_describe(indices)}")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-D {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows `indices` of `input` (first axis): (N, ...) -> (len(indices), ...)."""
    _check_first_axis(input, "input")
    _check_indices(indices)
    return input.index_select(0, indices.long())


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    """A zero tensor (first_axis_dim, ...) with row indices[i] set to values[i]; the inverse of
    index_first_axis for distinct indices."""
    _check_first_axis(values, "values")
    _check_indices(indices)
    if indices.shape[0] != values.shape[0]:
        raise ValueError(f"indices: expected {values.shape[0]} indices, one per row of values, got {indices.shape[0]}")
    output = values.new_zeros((int(first_axis_dim), *values.shape[1:]))
    return output.index_copy(0, indices.long(), values)


def _check_mask(hidden_states, mask, name: str) -> None:
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 2:
        raise ValueError(f"hidden_states: expected a tensor (batch, seqlen, ...), got {_describe(hidden_states)}")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.is_floating_point():
        raise ValueError(f"{name}: expected a 2-D bool or integer tensor (batch, seqlen), got {_describe(mask)}")
    if tuple(mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"{name}: expected shape {tuple(hidden_states.shape[:2])} = hidden_states' (batch, seqlen), "
                         f"got {tuple(mask.shape)}")


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, dim=0, dtype=torch.int32)
    return cu


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask: torch.Tensor | None = None):
    """Keep the tokens where attention_mask (batch, seqlen) is nonzero, in row-major order, and also those where
    unused_mask is (allocated but unused slots, which count in the lengths).

    Returns (hidden_states (total, ...), indices (total,) int64 into the flattened batch * seqlen
    positions, cu_seqlens (batch + 1,) int32, max_seqlen_in_batch: int, seqused (batch,) int32: the tokens
    attention_mask alone selects per row). The kept tokens of a row need not be contiguous (left or right
    padding both work); a row with no token gives length 0.
    """
    _check_mask(hidden_states, attention_mask, "attention_mask")
    kept = attention_mask
    if unused_mask is not None:
        _check_mask(hidden_states, unused_mask, "unused_mask")
        kept = attention_mask.bool() | unused_mask.bool()
    lengths = kept.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(kept.flatten(), as_tuple=False).flatten()
    max_seqlen = int(lengths.max().item()) if lengths.numel() else 0
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    seqused = attention_mask.sum(dim=-1, dtype=torch.int32)
    return index_first_axis(flat, indices), indices, _cumulative(lengths), max_seqlen, seqused


def unpad_input_for_concatenated_sequences(hidden_states: torch.Tensor, attention_mask_in_length: torch.Tensor):
    """Several short sequences packed at the start of each row, described by their lengths.

    attention_mask_in_length (batch, seqlen), integers: row b lists the lengths of the sequences
    packed one after another from position 0 of row b, followed by zeros (e.g. [2, 3, 0, 0, 0, 0]:
    tokens 0-1 are one sequence, 2-4 another, 5 is padding). Returns unpad_input's first four values
    (FA2 keeps four here), with one cu_seqlens entry per packed sequence (all rows' sequences in order).
    """
    _check_mask(hidden_states, attention_mask_in_length, "attention_mask_in_length")
    lengths_2d = attention_mask_in_length.to(torch.int64)
    if bool((lengths_2d < 0).any()):
        raise ValueError("attention_mask_in_length: expected lengths >= 0, got a negative entry")
    seqlen = lengths_2d.shape[1]
    totals = lengths_2d.sum(dim=-1)
    if bool((totals > seqlen).any()):
        raise ValueError(f"attention_mask_in_length: expected each row's lengths to sum to at most {seqlen}, "
                         f"got {int(totals.max())}")
    used = torch.arange(seqlen, device=lengths_2d.device)[None, :] < totals[:, None]
    indices = torch.nonzero(used.flatten(), as_tuple=False).flatten()
    flat_lengths = lengths_2d.flatten()
    lengths = flat_lengths[flat_lengths != 0].to(torch.int32)
    max_seqlen = int(lengths.max().item()) if lengths.numel() else 0
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, _cumulative(lengths), max_seqlen


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of unpad_input: (total, ...) -> (batch, seqlen, ...), zeros where nothing was kept."""
    batch, seqlen = int(batch), int(seqlen)
    output = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return output.view(batch, seqlen, *hidden_states.shape[1:])


__all__ = [
    "index_first_axis",
    "index_put_first_axis",
    "pad_input",
    "unpad_input",
    "unpad_input_for_concatenated_sequences",
]
