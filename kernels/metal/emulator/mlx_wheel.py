"""MLX's Metal kernel headers, fetched from PyPI's `mlx-metal` wheel at test time, verified and cached.

The emulator is validated against kernels known to work on real Macs (tests/emulator/test_mlx_kernels.py).
No MLX code is stored in this repository: the macOS wheel (about 45 MB) is downloaded once with pip,
checked against the SHA-256 pinned below (PyPI's simple index), and only the headers the tests need
(the include closure of `ROOT_HEADERS`, about 200 KB) are extracted into a private cache folder; the
wheel itself is then deleted. Each later use re-checks every extracted header against the digest
recorded at extraction, because the assembled source is compiled and loaded into the process.

    from mfa_hf.kernels.metal.emulator.mlx_wheel import mlx_kernels_dir
    root = mlx_kernels_dir()   # .../mlx/backend/metal/kernels (raises MlxWheelUnavailable)

| variable | meaning |
|---|---|
| `MFA_MLX_METAL_CACHE` | cache folder (default `$XDG_CACHE_HOME/mfa_hf/mlx-metal`, else `~/.cache/mfa_hf/mlx-metal`) |
| `MFA_MLX_METAL_OFFLINE=1` | no download is attempted; the tests skip (instead of failing) when nothing is cached |
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "0.32.4"
PLATFORM = "macosx_14_0_arm64"
WHEEL = f"mlx_metal-{VERSION}-py3-none-{PLATFORM}.whl"
# From https://pypi.org/simple/mlx-metal/ (the #sha256= fragment of the wheel's link).
SHA256 = "8019b2db622599267d66cc168b2f0dbf5af929790a6c3b3913e00eabc42a7947"
KERNELS_PREFIX = "mlx/include/mlx/backend/metal/kernels/"
ROOT_HEADERS = (
    "utils.h",
    "sdpa_vector.h",
    "steel/attn/kernels/steel_attention.h",
    "steel/gemm/mma.h",
)
OFFLINE_ENV = "MFA_MLX_METAL_OFFLINE"
CACHE_ENV = "MFA_MLX_METAL_CACHE"
_INCLUDE = re.compile(r'^\s*#\s*include\s+"mlx/backend/metal/kernels/([^"]+)"', re.M)


class MlxWheelUnavailable(RuntimeError):
    """The mlx-metal wheel could not be downloaded or did not verify (the message says why)."""


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mfa_hf" / "mlx-metal"


def mlx_kernels_dir() -> Path:
    """The folder holding `utils.h`, `sdpa_vector.h`, `steel/...` from the pinned wheel."""
    root = cache_root()
    _make_private(root)
    entry = root / f"{VERSION}-{SHA256[:16]}"
    if not _verified(entry):
        if offline():
            raise MlxWheelUnavailable(
                f"{OFFLINE_ENV} is set and {entry} holds no verified mlx-metal {VERSION} headers"
            )
        _populate(entry)
        if not _verified(entry):
            raise MlxWheelUnavailable(f"{entry}: the headers just extracted do not match their manifest")
    return entry / "kernels"


def _verified(entry: Path) -> bool:
    manifest = entry / "manifest.json"
    if not manifest.is_file():
        return False
    _check_private(entry)
    _check_private(manifest)
    files = json.loads(manifest.read_text())["files"]
    for name, digest in files.items():
        path = entry / "kernels" / name
        if not path.is_file():
            return False
        _check_private(path)
        if _sha256(path.read_bytes()) != digest:
            return False
    return all(name in files for name in ROOT_HEADERS)


def _populate(entry: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="mlx-metal-", dir=entry.parent) as tmp:
        wheel = _download(Path(tmp))
        digest = _sha256_file(wheel)
        if digest != SHA256:
            raise MlxWheelUnavailable(f"{wheel.name}: SHA-256 {digest}, expected {SHA256} (pinned from PyPI)")
        staged = Path(tmp) / "entry"
        staged.mkdir(mode=0o700)
        os.chmod(staged, 0o700)
        files = _extract_closure(wheel, staged / "kernels")
        manifest = staged / "manifest.json"
        manifest.write_text(json.dumps({"wheel": WHEEL, "wheel_sha256": SHA256, "files": files}, indent=1, sort_keys=True))
        os.chmod(manifest, 0o600)
        if entry.exists():
            shutil.rmtree(entry)  # an unverifiable leftover
        os.replace(staged, entry)  # atomic: concurrent runs extract the same bytes


def _download(folder: Path) -> Path:
    """pip (so the index and proxy configuration of CI apply) with the hash pinned."""
    requirement = folder / "requirement.txt"
    requirement.write_text(f"mlx-metal=={VERSION} --hash=sha256:{SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform", PLATFORM,
           "--require-hashes", "--no-cache-dir", "-d", str(folder), "-r", str(requirement)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MlxWheelUnavailable(f"`{' '.join(cmd)}` did not run: {exc}") from exc
    wheel = folder / WHEEL
    if done.returncode != 0 or not wheel.is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise MlxWheelUnavailable(
            f"could not download {WHEEL} from PyPI (needed to validate the emulator against MLX's kernels; "
            f"set {OFFLINE_ENV}=1 to skip these tests on a machine without network):\n{tail}"
        )
    return wheel


def _extract_closure(wheel: Path, dest: Path) -> dict[str, str]:
    """Extract ROOT_HEADERS and every header they include from MLX's kernels folder."""
    files: dict[str, str] = {}
    with zipfile.ZipFile(wheel) as zf:
        todo = list(ROOT_HEADERS)
        while todo:
            name = todo.pop()
            if name in files:
                continue
            try:
                data = zf.read(KERNELS_PREFIX + name)
            except KeyError:
                raise MlxWheelUnavailable(f"{WHEEL} has no {KERNELS_PREFIX}{name}") from None
            out = dest / name
            for folder in reversed([out.parent, *out.parent.parents]):
                if folder == dest.parent or dest.parent in folder.parents:
                    folder.mkdir(mode=0o700, exist_ok=True)
                    os.chmod(folder, 0o700)  # whatever the umask
            out.write_bytes(data)
            os.chmod(out, 0o600)
            files[name] = _sha256(data)
            todo += _INCLUDE.findall(data.decode())
    return files


def _make_private(root: Path) -> None:
    """Create missing folders 0700 whatever the umask; refuse an existing one that is not private."""
    missing, path = [], root
    while not path.exists():
        missing.append(path)
        path = path.parent
    for p in reversed(missing):
        p.mkdir(mode=0o700, exist_ok=True)
        os.chmod(p, 0o700)
    _check_private(root)


def _check_private(path: Path) -> None:
    """The assembled source is compiled and loaded: only this user may have written the cache."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise MlxWheelUnavailable(
            f"{path}: expected a file or folder owned by uid {os.getuid()} and not writable by group or "
            f"others, got owner {st.st_uid} mode {oct(st.st_mode & 0o777)}; set {CACHE_ENV} to a private folder"
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
