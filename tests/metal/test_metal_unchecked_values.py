"""Index values the host does not read back (off the CPU, mfa_hf.problem.values_checked) are clamped
inside the Metal kernels: a bad cu_seqlens, cache_seqlens or cache_batch_idx gives the result of
the nearest valid value, never a read or write outside the tensors. The kernels are called here
directly, past validation, with the bad values and with their clamped twins."""

import torch

from mfa_hf.kernels.metal.append import append
from mfa_hf.kernels.contract import AttentionCall, DecodeCall
from mfa_hf.kernels.metal.decode import decode as run_decode
from mfa_hf.kernels.metal.forward import forward


def _int32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def test_varlen_offsets_are_clamped_into_the_packed_tensors(metal_backend):
    device, g = metal_backend.device, torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(60, 2, 32, generator=g).to(device) for _ in range(3))

    def run(cu):
        cu = _int32(cu, device)
        return forward(AttentionCall.from_op_args((q, k, v, None, None, None, cu, cu, None, 0.2, -1, 0, 0.0, 0.0, 40, 40)))

    bad_out, bad_lse = run([0, 30, 999])  # the last sequence ends past the 60 packed rows
    good_out, good_lse = run([0, 30, 60])
    assert torch.equal(bad_out[:60].cpu(), good_out[:60].cpu()) and torch.equal(bad_lse.cpu(), good_lse.cpu())


def test_decode_lengths_and_rows_are_clamped_into_the_cache(metal_backend):
    device, g = metal_backend.device, torch.Generator().manual_seed(2)
    q = torch.randn(2, 1, 2, 32, generator=g).to(device)
    cache = torch.randn(3, 16, 1, 32, generator=g).to(device)

    def run(lengths, rows):
        return run_decode(DecodeCall.from_op_args((q, cache, None, cache, None, _int32(lengths, device),
                                                   _int32(rows, device), None, None, "none", "none", 32, 32, 0.2,
                                                   -1, -1, 0.0, 1)))

    bad = run([100, -5], [7, -1])
    good = run([16, 0], [2, 0])
    for mine, want in zip(bad, good):
        assert torch.equal(mine.cpu(), want.cpu())


def test_append_positions_and_rows_are_clamped_into_the_cache(metal_backend):
    device, g = metal_backend.device, torch.Generator().manual_seed(3)
    content = torch.randn(3, 8, 1, 32, generator=g)
    new = torch.randn(2, 2, 1, 32, generator=g).to(device)
    caches = []
    for lengths, rows in (([7, 50], [9, 1]), ([7, 7], [2, 1])):  # positions 7, 8 -> 7, 7 and 50, 51 -> 7, 7
        cache = content.clone().to(device)
        append(cache, new, _int32(lengths, device), _int32(rows, device))
        caches.append(cache.cpu())
    assert torch.equal(caches[0], caches[1])
    untouched = torch.ones(3, 8, dtype=torch.bool)
    untouched[2, 7] = untouched[1, 7] = False
    assert torch.equal(caches[0][untouched], content[untouched])  # nothing else was written
