"""The opt-in .pth file (`--install-pth`), run by Python's site module at every start-up: it serves
`import flash_attn` only with MFA_FLASH_ATTN_SHIM set, imports nothing heavy without it, and stays
quiet once mfa-hf is uninstalled."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mfa_hf.integrations import flash_attn_shim
from mfa_hf.integrations.flash_attn_shim.__main__ import main as install_pth

REPORT = "import sys; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'triton', 'mfa_hf', 'flash_attn'}))"


@pytest.fixture
def site_dir(tmp_path):
    folder = tmp_path / "site"
    folder.mkdir()
    assert install_pth(["--install-pth", str(folder)]) == 0
    assert (folder / flash_attn_shim.PTH_NAME).read_text() == flash_attn_shim.PTH_LINE
    return folder


def _start(site_dir, code: str, *flags: str, **env) -> subprocess.CompletedProcess:
    """A Python that processes site_dir's .pth files the way start-up does for site-packages."""
    program = f"import site; site.addsitedir({str(site_dir)!r}); {code}"
    environment = {key: value for key, value in os.environ.items() if key != flash_attn_shim.ENV_VAR}
    return subprocess.run([sys.executable, *flags, "-c", program], capture_output=True, text=True,
                          cwd=site_dir, env={**environment, **env}, timeout=300)


def test_the_file_is_one_line():
    assert flash_attn_shim.PTH_LINE.count("\n") == 1 and flash_attn_shim.PTH_LINE.startswith("import os;")


@pytest.mark.parametrize("value", [None, "0", ""], ids=["unset", "0", "empty"])
def test_without_the_variable_nothing_is_imported(site_dir, value):
    result = _start(site_dir, REPORT, **({} if value is None else {flash_attn_shim.ENV_VAR: value}))
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "[]\n")


def test_with_the_variable_flash_attn_is_served(site_dir):
    result = _start(site_dir, "import flash_attn; print(flash_attn.__version__)", MFA_FLASH_ATTN_SHIM="1")
    assert (result.returncode, result.stderr, result.stdout) == (0, "", f"{flash_attn_shim.VERSION}\n")


def test_after_mfa_hf_is_uninstalled_start_up_stays_quiet(site_dir):
    # -I -S: no site-packages, no PYTHONPATH, so mfa_hf is not importable; the .pth is still read.
    result = _start(site_dir, REPORT, "-I", "-S", MFA_FLASH_ATTN_SHIM="1")
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "[]\n")


def test_a_broken_mfa_hf_is_still_reported(site_dir):
    broken = site_dir / "mfa_hf"
    broken.mkdir()
    (broken / "__init__.py").write_text("import no_such_dependency_of_mfa_hf\n")
    result = _start(site_dir, REPORT, "-I", "-S", MFA_FLASH_ATTN_SHIM="1")
    assert "No module named 'no_such_dependency_of_mfa_hf'" in result.stderr
