"""The compiled-library cache loads only what this user built: a private folder, files owned by this
user, and a SHA-256 digest that matches the manifest (issue 16)."""

import ctypes
import hashlib
import json
import os
import stat
import subprocess
import sys
import time

import pytest
import torch

from mfa_hf.kernels.metal.emulator import UnsafeCacheError, compiler

SRC = r"""
#include <metal_stdlib>
using namespace metal;
kernel void add_one(device float* x, uint i [[thread_position_in_grid]]) { x[i] += 1.0f; }
"""

# A library that proves it was loaded: its constructor creates the file named by MSLEMU_TEST_MARKER.
PLANTED = r"""
#include <cstdio>
#include <cstdlib>
__attribute__((constructor)) static void planted() {
    if (const char* path = std::getenv("MSLEMU_TEST_MARKER")) std::fclose(std::fopen(path, "w"));
}
"""


def unique_source() -> str:
    return SRC + f"// unique {time.time_ns()}\n"


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def recorded_digest(library) -> str:
    return json.loads(library.with_suffix(".json").read_text())["sha256"]


def file_digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One private cache folder for the module, so the runtime object is built once."""
    folder = tmp_path_factory.mktemp("mslemu-cache")
    os.chmod(folder, 0o700)
    return folder


@pytest.fixture
def cache(shared_cache, monkeypatch):
    monkeypatch.setenv("MSLEMU_CACHE", str(shared_cache))
    return shared_cache


@pytest.fixture(scope="module")
def planted_library(emulator, tmp_path_factory):
    """Bytes of the marker library, checked to write its marker when loaded (so that a missing marker
    later means the library was not loaded, not that planting fails)."""
    folder = tmp_path_factory.mktemp("planted")
    cmd, _ = compiler.find_compiler()
    src, out = folder / "planted.cpp", folder / "control.so"
    src.write_text(PLANTED)
    subprocess.run([*cmd, "-shared", "-fPIC", str(src), "-o", str(out)], check=True)
    marker = folder / "control-marker"
    os.environ["MSLEMU_TEST_MARKER"] = str(marker)
    try:
        ctypes.CDLL(str(out))
    finally:
        del os.environ["MSLEMU_TEST_MARKER"]
    assert marker.exists(), "the control copy of the planted library must run its constructor"
    return out.read_bytes()


def load_and_run(emulator, source):
    x = torch.zeros(4)
    emulator.compile_shader(source).add_one(x)
    assert x.tolist() == [1.0] * 4


def test_second_build_hits_the_cache(emulator, cache, monkeypatch):
    source = unique_source()
    library, _ = compiler.build(source)
    inode = os.stat(library).st_ino

    def no_compile(*args, **kwargs):
        raise AssertionError("a cache hit must not run clang")

    monkeypatch.setattr(compiler, "_run", no_compile)
    again, kernels = compiler.build(source)
    assert again == library and os.stat(library).st_ino == inode and [k.name for k in kernels] == ["add_one"]
    assert recorded_digest(library) == file_digest(library)
    assert not list(cache.glob(".tmp-*")), "temporary files must be renamed into place"


def test_planted_library_without_manifest_is_not_loaded(emulator, cache, planted_library, tmp_path, monkeypatch):
    source = unique_source()
    library, _ = compiler.build(source)  # learn the entry's name, then replace it by a bare plant
    library.with_suffix(".json").unlink()
    library.write_bytes(planted_library)
    monkeypatch.setenv("MSLEMU_TEST_MARKER", str(tmp_path / "marker"))
    load_and_run(emulator, source)
    assert not (tmp_path / "marker").exists(), "the planted library was loaded"
    assert file_digest(library) == recorded_digest(library) != hashlib.sha256(planted_library).hexdigest()


def test_tampered_library_is_rebuilt_not_loaded(emulator, cache, planted_library, tmp_path, monkeypatch):
    source = unique_source()
    library, _ = compiler.build(source)
    recorded = recorded_digest(library)
    library.write_bytes(planted_library)  # the manifest still records the real library's digest
    monkeypatch.setenv("MSLEMU_TEST_MARKER", str(tmp_path / "marker"))
    load_and_run(emulator, source)
    assert not (tmp_path / "marker").exists(), "the tampered library was loaded"
    assert file_digest(library) == recorded_digest(library) == recorded


def test_tampered_runtime_object_is_rebuilt_not_linked(emulator, cache):
    compiler.build(unique_source())
    (runtime,) = cache.glob("runtime-*.o")
    recorded = json.loads(runtime.with_suffix(".json").read_text())["sha256"]
    runtime.write_bytes(b"not an object file")  # linking this would fail
    load_and_run(emulator, unique_source())
    assert file_digest(runtime) == recorded


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_folder_writable_by_others_is_refused(emulator, tmp_path, monkeypatch, mode):
    folder = tmp_path / "cache"
    folder.mkdir()
    os.chmod(folder, mode)
    monkeypatch.setenv("MSLEMU_CACHE", str(folder))
    expected = (f"MSLEMU_CACHE={folder}: expected a folder owned by uid {os.getuid()} and not writable by group "
                f"or others, got owner {os.getuid()} mode {oct(mode)}")
    with pytest.raises(UnsafeCacheError) as raised:
        compiler.build(unique_source())
    assert str(raised.value) == expected
    assert list(folder.iterdir()) == [], "nothing is built into a refused folder"


def test_cached_file_writable_by_others_is_refused(emulator, cache):
    source = unique_source()
    library, _ = compiler.build(source)
    os.chmod(library, 0o777)
    try:
        with pytest.raises(UnsafeCacheError, match=rf"emulator cache file {library}: expected a file owned by uid "
                                                   rf"{os.getuid()} .* got owner {os.getuid()} mode 0o777"):
            compiler.build(source)
    finally:
        os.chmod(library, 0o755)


def test_folder_of_another_user_is_refused(emulator, tmp_path, monkeypatch):
    """Simulated (tests need not run as root): this process pretends to be the next uid."""
    monkeypatch.setenv("MSLEMU_CACHE", str(tmp_path))
    me = os.getuid()
    monkeypatch.setattr(compiler, "_current_uid", lambda: me + 1)
    with pytest.raises(UnsafeCacheError, match=rf"expected a folder owned by uid {me + 1} and not writable by "
                                               rf"group or others, got owner {me} mode 0o700"):
        compiler.build(unique_source())


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="chown to another user needs root")
def test_folder_chowned_to_another_user_is_refused(emulator, tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    os.chown(folder, 12345, -1)
    monkeypatch.setenv("MSLEMU_CACHE", str(folder))
    with pytest.raises(UnsafeCacheError, match=r"expected a folder owned by uid 0 .* got owner 12345 mode 0o700"):
        compiler.build(unique_source())


def test_created_folders_are_private(tmp_path, monkeypatch):
    """Default folder and a nested MSLEMU_CACHE: every folder made is 0700 whatever the umask."""
    monkeypatch.delenv("MSLEMU_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    old = os.umask(0o022)
    try:
        default = compiler.cache_dir()
        monkeypatch.setenv("MSLEMU_CACHE", str(tmp_path / "a" / "b"))
        nested = compiler.cache_dir()
    finally:
        os.umask(old)
    assert default == tmp_path / "xdg" / "mfa_hf" / "mslemu"
    for folder in (default, default.parent, default.parent.parent, nested, nested.parent):
        assert mode_of(folder) == 0o700, folder


def test_parallel_processes_share_a_fresh_cache(emulator, tmp_path):
    """Two processes build the same new library into one new folder at once; both load it."""
    folder = tmp_path / "shared"
    code = (
        "import torch; from mfa_hf.kernels.metal.emulator import compile_shader\n"
        f"x = torch.zeros(8); compile_shader({unique_source()!r}).add_one(x); assert (x == 1).all()\n"
    )
    env = {**os.environ, "MSLEMU_CACHE": str(folder), "MSLEMU_WORKERS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    (library,) = folder.glob("*.so")
    assert file_digest(library) == recorded_digest(library) and mode_of(folder) == 0o700
