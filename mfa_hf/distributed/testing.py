"""A pool of gloo (or NCCL) worker processes for tests and benchmarks: started once, then given many tasks.

Starting a process and a process group costs seconds (importing torch), so a test module starts one
pool and sends it every case. Each worker runs `task(context, payload)` (a module-level function, so
that it pickles by name) and sends back its result or its exception. The world has `size` ranks; a
smaller case runs on the group of the first ranks (context.group_of(n)) while the others return None.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import tempfile
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 120


@dataclass
class Context:
    rank: int
    size: int
    groups: dict

    def group_of(self, ranks: int):
        """The group of ranks 0..ranks-1, or None when this rank is not in it."""
        return self.groups[ranks] if self.rank < ranks else None


@dataclass
class Failure:
    """An exception a worker raised: its type name, message and traceback text."""

    kind: str
    message: str
    trace: str


def _worker(rank: int, size: int, init_file: str, tasks, results, threads: int, subgroups: tuple,
            backend: str) -> None:
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=TIMEOUT_S))
    groups = {size: dist.GroupMember.WORLD}
    for n in subgroups:  # every rank creates every group, in the same order (a collective)
        groups[n] = dist.new_group(list(range(n)))
    context = Context(rank, size, groups)
    while True:
        task = tasks.get()
        if task is None:
            break
        function, payload = task
        try:
            results.put((rank, _settled(function(context, payload))))
        except BaseException as error:  # reported to the parent, which decides
            results.put((rank, Failure(type(error).__name__, str(error), traceback.format_exc())))
    dist.destroy_process_group()


def _settled(result):
    """The result with every functional collective's output waited for. Diffusers returns the gathered output
    of a context-parallel model as an AsyncCollectiveTensor, which waits for its gather only when a torch op
    reads it; pickling it for the parent reads its storage directly, and a gather not yet finished then
    arrived as uninitialised memory (a parallel output of NaN, now and then)."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.utils._pytree import tree_map_only

    return tree_map_only(AsyncCollectiveTensor, AsyncCollectiveTensor.wait, result)


@contextlib.contextmanager
def _without_shadowing_paths():
    """Spawned children start with the parent's sys.path. In a source checkout that holds the repository root,
    where our kernels/ folder (installed as mfa_hf.kernels) would shadow PyPI's `kernels` package, which
    transformers and diffusers import ("cannot import name 'CUDAProperties' from 'kernels'"); the root
    conftest.py keeps it out of the test process for the same reason. Leave such entries out while the
    children start (mfa_hf itself is importable from its install)."""
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if not (Path(p or os.getcwd()) / "kernels" / "contract.py").is_file()]
    try:
        yield
    finally:
        sys.path[:] = saved


class Pool:
    """`size` gloo ranks on this machine; run(task, payload) -> one result per rank."""

    def __init__(self, size: int, threads: int = 1, subgroups: tuple = (), backend: str = "gloo"):
        context = mp.get_context("spawn")
        self.size = size
        self._dir = tempfile.TemporaryDirectory()
        init_file = os.path.join(self._dir.name, "init")
        self._tasks = [context.Queue() for _ in range(size)]
        self._results = context.Queue()
        self._processes = [context.Process(target=_worker, daemon=True,
                                           args=(r, size, init_file, self._tasks[r], self._results, threads,
                                                 tuple(subgroups), backend))
                           for r in range(size)]
        with _without_shadowing_paths():
            for process in self._processes:
                process.start()

    def run(self, task, payload) -> list:
        """Every rank's result (a Failure where it raised), in rank order."""
        for tasks in self._tasks:
            tasks.put((task, payload))
        results: list = [None] * self.size
        for _ in range(self.size):
            try:
                rank, result = self._results.get(timeout=TIMEOUT_S + 30)
            except queue.Empty:
                raise TimeoutError(f"no answer from the pool within {TIMEOUT_S + 30} s") from None
            results[rank] = result
        return results

    def close(self) -> None:
        for tasks in self._tasks:
            tasks.put(None)
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
        self._dir.cleanup()


def raise_failures(results: list) -> list:
    """The results, or an AssertionError carrying the first worker traceback."""
    for rank, result in enumerate(results):
        if isinstance(result, Failure):
            raise AssertionError(f"rank {rank} raised {result.kind}: {result.message}\n{result.trace}")
    return results


def assert_refused(results: list, kind: str, expected: str, errors: tuple[str, ...] = ("ValueError",)) -> None:
    """Every rank that took part (a non-None result) raised one of `errors` with `expected` in its message."""
    involved = [r for r in results if r is not None]
    assert involved, "no rank took part"
    for result in involved:
        assert isinstance(result, Failure), f"{kind}: expected an error, got {result!r}"
        assert result.kind in errors and expected in result.message, result.message


def gather_unwaited(context: Context, payload: int):
    """Pool's own test task: an all-gather's output handed back without waiting for it (as Diffusers' gathered
    model output is), inside a structure; every rank contributes `payload` rows of its rank number."""
    from torch.distributed import _functional_collectives as funcol

    mine = torch.full((payload, 3), float(context.rank))
    return {"gathered": (funcol.all_gather_tensor(mine, 0, group=context.groups[context.size]),)}
