"""The MLX validation harness itself: the source rewrites (mlx_source.py) on small texts, and the
wheel cache's refusals (mlx_wheel.py), without downloading anything."""

import os

import pytest

from mfa_hf.kernels.metal.emulator import mlx_source, mlx_wheel


def test_function_constants_become_values_and_dropped_parameters_become_locals():
    text = """
constant bool has_mask [[function_constant(20)]];
constant int blocks [[function_constant(26)]];
template <typename T>
[[kernel]] void k(const device T* q [[buffer(0)]], device T* out [[buffer(1)]],
    const device bool* mask [[buffer(2), function_constant(has_mask)]],
    const constant int& stride [[buffer(3), function_constant(has_mask)]],
    uint lane [[thread_index_in_simdgroup]]) {
  if (has_mask) { out[0] = mask[stride]; }
}"""
    off = mlx_source.set_function_constants(text, {"has_mask": False, "blocks": 4})
    assert "constant bool has_mask = false;" in off and "constant int blocks = 4;" in off
    assert "[[buffer(2)" not in off and "const device bool* mask = nullptr;" in off and "const int stride = 0;" in off
    on = mlx_source.set_function_constants(text, {"has_mask": True, "blocks": 4})
    assert "const device bool* mask [[buffer(2)]]" in on and "function_constant" not in on
    with pytest.raises(mlx_source.MlxSourceError, match="missing values for \\['blocks'\\]"):
        mlx_source.set_function_constants(text, {"has_mask": True})


def test_buffer_gaps_get_placeholders_and_space_qualified_members_go():
    text = "[[kernel]] void k(device float* a [[buffer(0)]], constant int& n [[buffer(2)]]) { }"
    assert "const device uchar* mlx_unbound_buffer_1 [[buffer(1)]]" in mlx_source.fill_buffer_gaps(text)
    members = """struct c {
  constexpr c() thread : x(0) {};
  constexpr c() threadgroup : x(0) {};
  constexpr operator int() const device { return x; }
  int x;
};"""
    kept = mlx_source.drop_address_space_members(members)
    assert "c() thread" in kept and "threadgroup" not in kept and "device" not in kept
    assert kept.count("\n") == members.count("\n")  # line numbers kept for diagnostics


def test_offline_without_cache_is_an_error_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(mlx_wheel.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(mlx_wheel.OFFLINE_ENV, "1")
    with pytest.raises(mlx_wheel.MlxWheelUnavailable, match=mlx_wheel.OFFLINE_ENV):
        mlx_wheel.mlx_kernels_dir()
    assert (os.stat(tmp_path / "cache").st_mode & 0o777) == 0o700


def test_a_cache_others_can_write_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    monkeypatch.setenv(mlx_wheel.CACHE_ENV, str(shared))
    with pytest.raises(mlx_wheel.MlxWheelUnavailable, match="not writable by group or others"):
        mlx_wheel.mlx_kernels_dir()


def test_a_tampered_header_is_not_used(tmp_path, monkeypatch):
    """A header whose digest differs from the manifest makes the entry unverified (re-extracted)."""
    monkeypatch.setenv(mlx_wheel.CACHE_ENV, str(tmp_path))
    entry = tmp_path / f"{mlx_wheel.VERSION}-{mlx_wheel.SHA256[:16]}"
    (entry / "kernels").mkdir(parents=True)
    for name in mlx_wheel.ROOT_HEADERS:
        (entry / "kernels" / name).parent.mkdir(parents=True, exist_ok=True)
        (entry / "kernels" / name).write_text("// original\n")
    digests = {name: mlx_wheel._sha256(b"// original\n") for name in mlx_wheel.ROOT_HEADERS}
    (entry / "manifest.json").write_text(__import__("json").dumps({"files": digests}))
    for p in [entry, entry / "manifest.json", *(entry / "kernels").rglob("*")]:
        os.chmod(p, 0o700 if p.is_dir() else 0o600)
    assert mlx_wheel._verified(entry)
    (entry / "kernels" / "utils.h").write_text("// changed\n")
    assert not mlx_wheel._verified(entry)
