"""Running specs in a worker process per backend: crash isolation, and the backend's environment
(TRITON_INTERPRET / MFA_METAL_EMULATOR) set before mfa_hf is imported. A kernel that aborts the process
fails one case (the worker restarts) instead of killing pytest."""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import traceback

import torch

from .layouts import SpecNotApplicable
from .run import current_backend, run_spec


def prepare_process() -> None:
    """What the tests' fixtures do, for a worker: poisoned outputs; small tiles for the torch backend."""
    from ..kernels import launch as ops  # POISON_OUTPUTS lives with the output allocation

    ops.POISON_OUTPUTS = True
    if current_backend() == "torch":
        from ..kernels.torch import tiles

        tiles.TILING = tiles.Tiling(score_block_elements=64, key_tile=8, min_query_tile=4, max_query_tile=8)


def _send(stream, obj) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _read_exact(stream, count: int) -> bytes | None:
    chunks, left = [], count
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(stream):
    header = _read_exact(stream, 8)
    if header is None:
        return None
    data = _read_exact(stream, struct.unpack("<Q", header)[0])
    return None if data is None else pickle.loads(data)


def worker_main() -> None:
    """A worker's loop: read a spec, run it, answer ("ok", failures) or ("error", traceback)."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # prints (Python's or a kernel's) go to stderr, never into the replies
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer
    prepare_process()
    while True:
        spec = _recv(requests)
        if spec is None:
            return
        try:
            reply = ("ok", run_spec(spec))
        except SpecNotApplicable as reason:
            reply = ("skip", str(reason))
        except BaseException:  # noqa: BLE001 - reported to the parent
            reply = ("error", traceback.format_exc())
        _send(replies, reply)


def worker_environment(backend: str) -> dict:
    env = dict(os.environ, MFA_BACKEND=backend)
    env.pop("MFA_TRACE", None)
    if backend == "metal" and not torch.backends.mps.is_available():
        env["MFA_METAL_EMULATOR"] = "1"
    if backend == "triton" and os.environ.get("MFA_TRITON_FULL") != "1":
        env["TRITON_INTERPRET"] = "1"
    return env


class IsolatedRunner:
    """Runs specs in a worker process with `backend`'s environment. A worker that dies (a kernel
    aborting, a segfault) or hangs fails that spec; the next spec starts a fresh worker."""

    def __init__(self, backend: str, timeout: float = 600.0):
        self.backend = backend
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix=f"mfa-layouts-{backend}-", suffix=".log", delete=False)
        self.starts = 0

    def _start(self) -> None:
        self.close()
        self.starts += 1
        code = "from mfa_hf.testing_layouts.isolation import worker_main; worker_main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.log.name, "ab"), env=worker_environment(self.backend),
                                     bufsize=0)

    def _stderr_since(self, mark: int, lines: int = 20) -> str:
        with open(self.log.name, "rb") as log:
            log.seek(mark)
            text = log.read().decode(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def run(self, spec) -> list[str]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        mark = os.path.getsize(self.log.name)
        try:
            _send(self.proc.stdin, spec)
        except (BrokenPipeError, OSError):
            pass  # the worker is gone: reported below
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            self.close()
            return [f"the {self.backend} worker timed out after {self.timeout:.0f} s on this case"]
        reply = _recv(self.proc.stdout)
        if reply is None:
            code = self.proc.wait()
            self.proc = None
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            tail = self._stderr_since(mark)
            return [f"the {self.backend} worker process died ({how}) running this case; its stderr:\n{tail}"]
        status, payload = reply
        if status == "skip":
            raise SpecNotApplicable(payload)
        if status == "error":
            return [f"the harness raised in the {self.backend} worker:\n{payload}"]
        return payload

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __del__(self):
        try:
            self.close()
            os.unlink(self.log.name)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

