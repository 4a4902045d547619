"""Only internals.py may name a private diffusers attribute (DESIGN.md, "Living with fast-moving
dependencies"): there the probe guards it; anywhere else a diffusers release that renames it breaks
us without a word. Every other .py file of integrations/diffusers is parsed and must not contain:

- an import of a private name or module from diffusers (`from diffusers.x import _Name`);
- an attribute access `x._name` (one leading underscore: private and Enum `_sunder_` names), unless
  `x` is `self`, `cls` or a name this module defines or imports from mfa_hf;
- a private name spelled as a string (`hasattr(p, "_attention_backend")`, `vars(p).pop("_x")`).
"""

import ast
import pathlib
import re

import mfa_hf.integrations.diffusers as integration

PACKAGE = pathlib.Path(integration.__file__).parent
EXEMPT = "internals.py"
_PRIVATE = re.compile(r"_(?!_)\w*\Z")  # "_x", "_x_"; not "__dunder__"


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


def _diffusers_import(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "diffusers":
        parts = node.module.split(".") + [alias.name for alias in node.names]
    elif isinstance(node, ast.Import):
        parts = [part for alias in node.names if alias.name.split(".")[0] == "diffusers"
                 for part in alias.name.split(".")]
    else:
        return []
    return [part for part in parts if _PRIVATE.match(part)]


def private_touches(source: str, filename: str = "<source>") -> list[str]:
    """'file:line: what' for every private diffusers name the source touches."""
    tree = ast.parse(source, filename)
    ours, found = _ours(tree), []
    for node in ast.walk(tree):
        what = [f"imports {part} from diffusers" for part in _diffusers_import(node)]
        if isinstance(node, ast.Attribute) and _PRIVATE.match(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ours):
                what.append(f".{node.attr} on {ast.unparse(node.value)}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _PRIVATE.match(node.value):
            what.append(f"the string {node.value!r}")
        found += [(node.lineno, text) for text in what]
    return [f"{filename}:{line}: {text}" for line, text in sorted(found)]


def _sources() -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(PACKAGE.glob("*.py"))}


def test_only_internals_touches_private_diffusers_names():
    sources = _sources()
    assert EXEMPT in sources, f"expected {EXEMPT} in {PACKAGE}, got {sorted(sources)}"
    checked = {name: source for name, source in sources.items() if name != EXEMPT}
    assert len(checked) >= 7, f"expected the integration's modules in {PACKAGE}, got {sorted(checked)}"
    touches = [touch for name, source in checked.items() for touch in private_touches(source, name)]
    assert not touches, "private diffusers names outside internals.py (move them there):\n" + "\n".join(touches)


def test_the_checker_sees_what_internals_touches():
    """Not vacuous: on internals.py itself it reports the very names the rule is about."""
    touches = "\n".join(private_touches(_sources()[EXEMPT], EXEMPT))
    for name in ("_AttentionBackendRegistry", "._value2member_map_", "._backends", "'_attention_backend'"):
        assert name in touches, f"expected the checker to report {name} in {EXEMPT}, got:\n{touches}"


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
    }
    for source, expected in caught.items():
        touches = private_touches(source)
        assert any(expected in touch for touch in touches), (source, touches)
    spared = [
        "class A:\n    def f(self):\n        return self._x\n    @classmethod\n    def g(cls):\n        return cls._z",
        "def _helper(): pass\n_helper()",
        "from .processors import MFAProcessor\nMFAProcessor._mask(None, None, 1, 1)",
        "_CACHE = {}\n_CACHE.clear()\nx.__dict__.get('public')\nprint(x.__class__)",
        "raise ValueError('(_parallel_config=None) is expected')",
    ]
    for source in spared:
        assert private_touches(source) == [], source
