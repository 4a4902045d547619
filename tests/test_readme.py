"""The READMEs' ```python blocks run as pasted: each in a fresh Python, here on the CPU (on a Mac they
pick mps). A block that cannot run here (it downloads from the hub) is marked, on the line before
its fence, with `<!-- readme-test: skip (the reason) -->`."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "integrations/transformers/README.md", "integrations/diffusers/README.md")
SKIP = re.compile(r"<!-- readme-test: skip \((?P<reason>[^)]+)\) -->")
TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    readme: str
    line: int  # of the opening fence, 1-based
    code: str
    skip: str | None  # the reason, for a marked block

    @property
    def where(self) -> str:
        return f"{self.readme}:{self.line}"


def python_blocks(readme: str) -> list[Block]:
    lines = (ROOT / readme).read_text().splitlines()
    blocks, start, skip, marker = [], None, None, None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == "```python":
            start, skip, marker = number, marker, None
        elif start is not None and line.strip() == "```":
            blocks.append(Block(readme, start, "\n".join(lines[start:number - 1]) + "\n", skip))
            start = None
        elif start is None and line.strip():
            if marker is not None:
                raise ValueError(f"{readme}:{number}: a readme-test marker must sit right before a ```python fence")
            found = SKIP.fullmatch(line.strip())
            marker = found["reason"] if found else None
    return blocks


BLOCKS = [block for readme in READMES for block in python_blocks(readme)]


@pytest.mark.parametrize("readme", READMES)
def test_each_readme_has_runnable_blocks(readme):
    blocks = python_blocks(readme)
    assert blocks, f"{readme}: no ```python blocks found"
    runnable = [block for block in blocks if block.skip is None]
    assert len(runnable) > len(blocks) / 2, f"{readme}: skipping is the exception, {len(runnable)}/{len(blocks)} run"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.skip is None], ids=lambda block: block.where)
def test_block_runs(block, tmp_path):
    result = subprocess.run([sys.executable, "-c", block.code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    if result.returncode != 0:
        first = block.code.strip().splitlines()[0]
        pytest.fail(f"{block.where} (`{first}`): {_error(result.stderr)}\n\n{result.stderr[-3000:]}", pytrace=False)


def _error(stderr: str) -> str:
    """The exception line of the last traceback (its first unindented line), else the last line."""
    lines = stderr.splitlines()
    marker = "Traceback (most recent call last):"
    if marker in lines:
        after = lines[len(lines) - lines[::-1].index(marker):]
        return next((line for line in after if line and not line.startswith(" ")), after[-1] if after else marker)
    return lines[-1] if lines else "(no stderr)"
