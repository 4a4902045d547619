"""Point-to-point and all-to-all transfers over a process group, staged through CPU memory where the
group's backend cannot read the tensors' device.

torch's gloo backend handles CPU (and CUDA) tensors only, and it is the backend torch picks for "mps";
so on a Mac every tensor crosses CPU memory on its way out and in. `needs_staging` decides that once
per call; `Transfer` hides it: sends copy to the CPU first, receives land in a CPU buffer and are
copied to the device when waited on. MFA_CP_STAGE=1 forces staging (the benchmark measures its cost
on a CPU-only machine with it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

GLOO_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Group:
    """A resolved process group: the handle torch takes, this process's rank in it, its size."""

    handle: object
    rank: int
    size: int
    staged: bool = False

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.handle, group_rank) if self.handle is not dist.GroupMember.WORLD \
            else group_rank

    def with_staging(self, device: torch.device) -> "Group":
        return Group(self.handle, self.rank, self.size, needs_staging(self.handle, device))


def resolve_group(group) -> Group:
    """`group` (None: the default group) checked: torch.distributed is initialised and this process is in it."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("group: expected an initialised torch.distributed (call "
                           "torch.distributed.init_process_group first), got none")
    handle = dist.GroupMember.WORLD if group is None else group
    rank = dist.get_rank(handle)
    if rank < 0:
        raise ValueError(f"group: expected a process group this process (global rank {dist.get_rank()}) belongs "
                         f"to, got one it is not a member of")
    return Group(handle, rank, dist.get_world_size(handle))


def needs_staging(handle, device: torch.device) -> bool:
    if os.environ.get("MFA_CP_STAGE", "0") == "1":
        return True
    return dist.get_backend(handle) == "gloo" and device.type not in GLOO_DEVICES


@dataclass
class Transfer:
    """Posted sends and receives; wait() returns the received tensors on their device, in order."""

    works: list = field(default_factory=list)
    received: list = field(default_factory=list)  # (buffer, device to move it to)

    def wait(self) -> list[torch.Tensor]:
        for work in self.works:
            work.wait()
        self.works = []
        return [buffer.to(device, non_blocking=False) for buffer, device in self.received]


def _on_the_wire(group: Group, tensor: torch.Tensor) -> torch.Tensor:
    """What a send hands the backend: contiguous, and in CPU memory when the group stages (gloo with mps)."""
    return (tensor.detach().to("cpu") if group.staged else tensor.detach()).contiguous()


def post(group: Group, sends: list[tuple[torch.Tensor, int, int]],
         receives: list[tuple[torch.Tensor, int, int]]) -> Transfer:
    """Start sends (tensor, to group rank, tag) and receives (like-tensor, from group rank, tag) at once."""
    transfer = Transfer()
    for tensor, peer, tag in sends:
        transfer.works.append(dist.isend(_on_the_wire(group, tensor), group.global_rank(peer), group.handle, tag))
    for like, peer, tag in receives:
        device = "cpu" if group.staged else like.device
        buffer = torch.empty(like.shape, dtype=like.dtype, device=device)
        transfer.works.append(dist.irecv(buffer, group.global_rank(peer), group.handle, tag))
        transfer.received.append((buffer, like.device))
    return transfer


def ring_shift(group: Group, tensors: list[torch.Tensor], hops: int = 1, tag: int = 0) -> Transfer:
    """Send each tensor `hops` ranks ahead and receive the ones from `hops` ranks behind."""
    ahead, behind = (group.rank + hops) % group.size, (group.rank - hops) % group.size
    sends = [(t, ahead, tag + i) for i, t in enumerate(tensors)]
    receives = [(t, behind, tag + i) for i, t in enumerate(tensors)]
    return post(group, sends, receives)


def all_to_all(group: Group, x: torch.Tensor) -> torch.Tensor:
    """x (P, ...): slice p goes to rank p; returns (P, ...) whose slice p came from rank p."""
    device = x.device
    payload = _on_the_wire(group, x)
    result = torch.empty_like(payload)
    dist.all_to_all_single(result, payload, group=group.handle)
    return result.to(device)
