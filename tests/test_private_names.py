"""Private transformers names are touched only in integrations/transformers/internals.py.

A private name is a single-underscore attribute (not a dunder) read or written on anything but
`self`/`cls`/our own modules, or a single-underscore name imported from transformers. Those are
what change between releases without notice; keeping them in one probed module is the release
policy (see internals.py). The checker is tested on sources that must and must not pass, so it
cannot pass vacuously.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "integrations" / "transformers"
INTERNALS = "internals.py"
OWN_BASES = {"self", "cls", "internals", "mfa_hf", "trace", "api", "kvcache", "decode"}
# torch's, not transformers': a tensor's version counter (mask_memo reuses facts while it is unchanged).
TORCH_PRIVATE = {"_version"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(source: str, package: str = "transformers") -> list[str]:
    """'line: what' for every private access the rule forbids."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == package:
            found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names if _private(a.name)]
            if any(_private(part) for part in (node.module or "").split(".")):
                found.append(f"{node.lineno}: from {node.module}")
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in TORCH_PRIVATE:
            base = node.value
            own = isinstance(base, ast.Name) and (base.id in OWN_BASES or _private(base.id))
            if not own:
                found.append(f"{node.lineno}: .{node.attr}")
    return found


def _sources() -> list[Path]:
    return sorted(p for p in ROOT.glob("*.py") if p.name != INTERNALS)


def test_the_rule_sees_what_it_must():
    bad = ("from transformers.modeling_flash_attention_utils import _flash_attention_forward\n"
           "x = module.config._attn_implementation\n"
           "PreTrainedModel._check_and_adjust_attn_implementation = f\n"
           "mfu._lazy_imports(name)\n")
    assert len(private_uses(bad)) == 4
    good = "self._x = 1\nfrom transformers import Cache\ninternals.flash_attention_forward(q)\n_local._y\n"
    assert private_uses(good) == []


def test_internals_module_exists_and_others_are_scanned():
    assert (ROOT / INTERNALS).is_file()
    assert len(_sources()) >= 8
    assert private_uses((ROOT / INTERNALS).read_text()), "internals.py touches private names: the rule found none"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: p.name)
def test_only_internals_touches_private_transformers_names(path):
    uses = private_uses(path.read_text())
    assert not uses, f"{path.name}: private names outside internals.py: {uses}"
