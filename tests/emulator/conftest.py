from pathlib import Path

import pytest

from mfa_hf.kernels.metal.emulator.pytest_fixtures import emulator, metal  # noqa: F401

EXAMPLES = Path(__file__).resolve().parents[2] / "kernels" / "metal" / "emulator" / "examples"


@pytest.fixture(scope="session")
def example_source():
    """Source text of a kernel file in kernels/metal/emulator/examples/."""
    return lambda name: (EXAMPLES / name).read_text()
