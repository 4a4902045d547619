from pathlib import Path

import pytest

from mfa_hf.kernels.metal.emulator.mlx_wheel import MlxWheelUnavailable, mlx_kernels_dir, offline
from mfa_hf.kernels.metal.emulator.pytest_fixtures import emulator, metal  # noqa: F401

EXAMPLES = Path(__file__).resolve().parents[2] / "kernels" / "metal" / "emulator" / "examples"


@pytest.fixture(scope="session")
def example_source():
    """Source text of a kernel file in kernels/metal/emulator/examples/."""
    return lambda name: (EXAMPLES / name).read_text()


@pytest.fixture(scope="session")
def mlx_dir():
    """MLX's kernel headers (mlx_wheel.py). Without them: a failure naming the reason, or a skip
    under MFA_MLX_METAL_OFFLINE=1."""
    try:
        return mlx_kernels_dir()
    except MlxWheelUnavailable as exc:
        if offline():
            pytest.skip(f"MFA_MLX_METAL_OFFLINE: {exc}")
        pytest.fail(f"MLX's kernel headers are needed to validate the emulator: {exc}", pytrace=False)
