"""Every notebook in notebooks/ runs top to bottom on CPU within its time budget (nbclient)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat, nbclient and ipykernel")
nbclient = pytest.importorskip("nbclient")

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
BUDGET_S = 120


def test_notebooks_are_the_generated_ones():
    # The .ipynb files come from make_notebooks.py; an edit to one side only is caught here.
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_notebooks", FOLDER / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert sorted(p.name for p in NOTEBOOKS) == sorted(module.NOTEBOOKS)
    for path in NOTEBOOKS:
        assert json.loads(path.read_text()) == module.notebook(module.NOTEBOOKS[path.name]), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_cpu(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=BUDGET_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell on any error
    elapsed = time.perf_counter() - start
    print(f"{path.name}: {elapsed:.1f} s")
    assert elapsed < BUDGET_S
