"""Only each integration's internals.py may name a private transformers / diffusers attribute
(DESIGN.md, "Living with fast-moving dependencies"): there a contract probe guards it; anywhere else
a release that renames it breaks us without a word. Every other .py file of integrations/transformers
and integrations/diffusers is parsed and must not contain:

- an import of a private name or module from the library (`from diffusers.x import _Name`);
- an attribute access `x._name` (one leading underscore: private and Enum `_sunder_` names), unless
  `x` is `self`, `cls` or a name the module defines or imports from mfa_hf (torch's own `_version`
  counter on tensors is allowed);
- a private name spelled as a string (`hasattr(p, "_attention_backend")`, `vars(p).pop("_x")`).
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

INTEGRATIONS = pathlib.Path(__file__).resolve().parents[1] / "integrations"
LIBRARIES = {"transformers": "transformers", "diffusers": "diffusers"}  # folder -> library it integrates
EXEMPT = "internals.py"
_PRIVATE = re.compile(r"_(?!_)\w*\Z")  # "_x", "_x_"; not "__dunder__"
TORCH_PRIVATE = {"_version"}  # a tensor's version counter (mask_memo reuses facts while it is unchanged)


def _ours(tree: ast.Module) -> set[str]:
    """Names bound at module level by our own code: definitions, assignments, imports from mfa_hf."""
    names = {"self", "cls"}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("mfa_hf")):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def _library_import(node: ast.AST, library: str) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == library:
        parts = node.module.split(".") + [alias.name for alias in node.names]
    elif isinstance(node, ast.Import):
        parts = [part for alias in node.names if alias.name.split(".")[0] == library for part in alias.name.split(".")]
    else:
        return []
    return [part for part in parts if _PRIVATE.match(part)]


def private_touches(source: str, library: str, filename: str = "<source>") -> list[str]:
    """'file:line: what' for every private name of `library` the source touches."""
    tree = ast.parse(source, filename)
    ours, found = _ours(tree), []
    for node in ast.walk(tree):
        what = [f"imports {part} from {library}" for part in _library_import(node, library)]
        if isinstance(node, ast.Attribute) and _PRIVATE.match(node.attr) and node.attr not in TORCH_PRIVATE:
            if not (isinstance(node.value, ast.Name) and node.value.id in ours):
                what.append(f".{node.attr} on {ast.unparse(node.value)}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _PRIVATE.match(node.value):
            what.append(f"the string {node.value!r}")
        found += [(node.lineno, text) for text in what]
    return [f"{filename}:{line}: {text}" for line, text in sorted(found)]


def _sources(folder: str) -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted((INTEGRATIONS / folder).glob("*.py"))}


@pytest.mark.parametrize("folder", sorted(LIBRARIES))
def test_only_internals_touches_private_names(folder):
    sources = _sources(folder)
    assert EXEMPT in sources, f"expected {EXEMPT} in integrations/{folder}, got {sorted(sources)}"
    checked = {name: source for name, source in sources.items() if name != EXEMPT}
    assert len(checked) >= 7, f"expected the integration's modules in integrations/{folder}, got {sorted(checked)}"
    touches = [t for name, source in checked.items() for t in private_touches(source, LIBRARIES[folder], name)]
    assert not touches, f"private {folder} names outside internals.py (move them there):\n" + "\n".join(touches)


@pytest.mark.parametrize("folder, expected", [
    ("diffusers", ("_AttentionBackendRegistry", "._value2member_map_", "._backends", "'_attention_backend'")),
    ("transformers", ("._flash_attention_forward", "._lazy_imports", "._check_and_adjust_attn_implementation",
                      "'_attn_implementation'")),
])
def test_the_checker_sees_what_internals_touches(folder, expected):
    """Not vacuous: on internals.py itself it reports the very names the rule is about."""
    touches = "\n".join(private_touches(_sources(folder)[EXEMPT], LIBRARIES[folder], EXEMPT))
    for name in expected:
        assert name in touches, f"expected the checker to report {name} in {folder}/{EXEMPT}, got:\n{touches}"


def test_the_checker_catches_each_kind_and_spares_our_own_names():
    caught = {
        "processor._attention_backend = member": "._attention_backend on processor",
        "from diffusers.models.attention_dispatch import AttentionBackendName\n"
        "AttentionBackendName._value2member_map_.get('mfa')": "._value2member_map_",
        "from diffusers.models.attention_dispatch import _AttentionBackendRegistry": "imports _AttentionBackendRegistry",
        "import diffusers.models._modeling_parallel": "imports _modeling_parallel",
        "hasattr(getattr(attn, 'processor', None), '_attention_backend')": "'_attention_backend'",
        "def f(member):\n    member._name_ = 'MFA'": "._name_",
        "self.registry._backends.pop(member)": "._backends on self.registry",
        "x = module.config._attn_implementation": "._attn_implementation on module.config",
    }
    for source, expected in caught.items():
        touches = private_touches(source, "diffusers")
        assert any(expected in touch for touch in touches), (source, touches)
    assert private_touches("from transformers.modeling_flash_attention_utils import _flash_attention_forward",
                           "transformers")
    spared = [
        "class A:\n    def f(self):\n        return self._x\n    @classmethod\n    def g(cls):\n        return cls._z",
        "def _helper(): pass\n_helper()",
        "from .processors import MFAProcessor\nMFAProcessor._mask(None, None, 1, 1)",
        "_CACHE = {}\n_CACHE.clear()\nx.__dict__.get('public')\nprint(x.__class__)",
        "raise ValueError('(_parallel_config=None) is expected')",
        "from . import internals\ninternals.flash_attention_forward(q)\nmask._version",
    ]
    for source in spared:
        assert private_touches(source, "diffusers") == [], source
