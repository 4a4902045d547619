"""Run one benchmark measurement in a fresh subprocess and read back its JSON row."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def measure_in_subprocess(module: str, spec: dict, backend: str | None = None) -> dict:
    env = os.environ.copy()
    if backend is not None:
        env["MFA_BACKEND"] = backend  # forced: a backend that cannot serve raises instead of falling back
    completed = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], capture_output=True,
                               text=True, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark worker {module} failed for {spec}:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])
