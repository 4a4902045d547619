import pytest

from mfa_hf.kernels import launch
from mfa_hf.kernels.torch import tiles


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN, so unwritten elements fail the comparison."""
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 8 keys x >= 4 queries, so small problems cross many block boundaries."""
    monkeypatch.setattr(tiles, "TILING", tiles.Tiling(score_block_elements=64, key_tile=8, min_query_tile=4, max_query_tile=8))
