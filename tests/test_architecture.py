"""The shape of kernels/, checked on the source (ast): no backend is imported, so no triton is needed.

Issue 18: one folder shape per backend, with the same file roles under the same names, and private
helpers are not imported across modules.
- Every backend that mfa_hf/dispatch.py's REGISTRY names is a folder kernels/<name>/ with backend.py
  (`supports` and `BACKEND`, its launchers imported from the role files), forward.py (`forward`),
  backward.py (`backward`) and decode.py (`decode`).
- kernels/ depends on mfa_hf only through leaf modules (problem, kv_formats, quant, scalars,
  kernel_fallback), never on ops, api, dispatch, kvcache, integrations or the package root.
- No module under kernels/ imports a `_private` name from another module (the emulator included).
- kernels/contract.py and kernels/launch.py import only torch and the standard library (and each other).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
PACKAGE = "mfa_hf.kernels"  # pyproject maps kernels/ to it
ROLES = {"backend.py": "BACKEND", "forward.py": "forward", "backward.py": "backward", "decode.py": "decode"}
LAUNCHERS = ("forward", "backward", "decode")
MFA_LEAVES = {"problem", "kv_formats", "quant", "scalars", "kernel_fallback"}
LEAF_CORE = ("contract.py", "launch.py")


def registry(root: Path = ROOT) -> list[tuple[str, str]]:
    """REGISTRY's (name, module) pairs, read from dispatch.py's source."""
    tree = ast.parse((root / "mfa_hf" / "dispatch.py").read_text())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "REGISTRY" for t in targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("mfa_hf/dispatch.py: expected a REGISTRY assignment")


def backend_folder(module: str, kernels: Path = KERNELS) -> Path:
    """mfa_hf.kernels.<name>.backend -> kernels/<name>."""
    prefix = PACKAGE + "."
    assert module.startswith(prefix) and module.endswith(".backend"), (
        f"REGISTRY: expected modules {prefix}<name>.backend, got {module}")
    return kernels.joinpath(*module[len(prefix):].split(".")[:-1])


def top_level_names(tree: ast.Module) -> dict[str, ast.AST]:
    """Names a module binds at top level: functions, classes, assignments and imports."""
    names: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = node
    return names


def module_name(path: Path, kernels: Path = KERNELS) -> str:
    parts = path.relative_to(kernels).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def absolute(node: ast.ImportFrom, path: Path, kernels: Path = KERNELS) -> str:
    """The absolute module a `from ... import` reads from."""
    if node.level == 0:
        return node.module or ""
    package = module_name(path, kernels).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(tree: ast.AST, path: Path, kernels: Path = KERNELS):
    """(line, imported module, names taken from it or None) for every import, nested ones included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, absolute(node, path, kernels), [alias.name for alias in node.names]


def kernel_modules(kernels: Path = KERNELS) -> list[Path]:
    return sorted(kernels.rglob("*.py"))


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


# -- the checks, as functions of a tree root, so that a planted violation can be shown to fail them --

def role_problems(root: Path = ROOT) -> list[str]:
    problems = []
    for name, module in registry(root):
        folder = backend_folder(module, root / "kernels")
        for file, wanted in ROLES.items():
            path = folder / file
            if not path.is_file():
                problems.append(f"{name}: expected {path.relative_to(root)}, found none")
                continue
            tree = ast.parse(path.read_text())
            defined = top_level_names(tree)
            if file == "backend.py":
                problems += backend_problems(name, path.relative_to(root), tree, defined)
            elif not isinstance(defined.get(wanted), (ast.FunctionDef, ast.AsyncFunctionDef)):
                problems.append(f"{name}: expected {path.relative_to(root)} to define `def {wanted}`")
    return problems


def backend_problems(name: str, where: Path, tree: ast.Module, defined: dict) -> list[str]:
    """backend.py: BACKEND and supports() defined here, the launchers imported from their role files."""
    problems = []
    if not isinstance(defined.get("BACKEND"), (ast.Assign, ast.AnnAssign)):
        problems.append(f"{name}: expected {where} to assign BACKEND")
    if not isinstance(defined.get("supports"), ast.FunctionDef):
        problems.append(f"{name}: expected {where} to define `def supports`")
    for launcher in LAUNCHERS:
        node = defined.get(launcher)
        if not (isinstance(node, ast.ImportFrom) and node.level == 1 and node.module == launcher):
            problems.append(f"{name}: expected {where} to take `{launcher}` from .{launcher} "
                            f"(`from .{launcher} import {launcher}`), got {type(node).__name__ if node else 'nothing'}")
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "supports" \
                and not is_private(node.name):
            problems.append(f"{name}: {where}:{node.lineno} defines `{node.name}`: backend.py holds supports() "
                            "and BACKEND (launchers live in forward.py, backward.py, decode.py, append.py)")
    return problems


def mfa_import_problems(kernels: Path = KERNELS) -> list[str]:
    problems = []
    for path in kernel_modules(kernels):
        for line, module, names in imports(ast.parse(path.read_text()), path, kernels):
            parts = module.split(".")
            if parts[0] != "mfa_hf" or module == PACKAGE or module.startswith(PACKAGE + "."):
                continue
            where = f"{path.relative_to(kernels.parent)}:{line}"
            if len(parts) == 1:  # `import mfa_hf` or `from mfa_hf import x`
                for leaf in names or ["(the package)"]:
                    if leaf not in MFA_LEAVES and leaf != "kernels":
                        problems.append(f"{where}: imports mfa_hf.{leaf}; kernels/ may import from mfa_hf only "
                                        f"{sorted(MFA_LEAVES)}")
            elif parts[1] not in MFA_LEAVES and parts[1] != "kernels":
                problems.append(f"{where}: imports {module}; kernels/ may import from mfa_hf only {sorted(MFA_LEAVES)}")
    return problems


def private_import_problems(kernels: Path = KERNELS) -> list[str]:
    problems = []
    for path in kernel_modules(kernels):
        tree = ast.parse(path.read_text())
        for line, module, names in imports(tree, path, kernels):
            where = f"{path.relative_to(kernels.parent)}:{line}"
            for name in names or []:
                if is_private(name):
                    problems.append(f"{where}: imports the private name {name} from {module}")
            if any(is_private(part) for part in module.split(".")):
                problems.append(f"{where}: imports from the private module {module}")
        problems += private_attribute_problems(path, tree, kernels)
    return problems


def module_file(module: str, kernels: Path) -> Path | None:
    """The source file of a module of this project (mfa_hf.kernels.* under kernels/, mfa_hf.* beside it)."""
    parts = module.split(".")
    if parts[0] != "mfa_hf":
        return None
    if parts[1:2] == ["kernels"]:
        base = kernels.joinpath(*parts[2:])
    else:
        base = kernels.parent.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def private_attribute_problems(path: Path, tree: ast.Module, kernels: Path) -> list[str]:
    """`module._name` where `module` names a module of this project (`from . import loader`)."""
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = absolute(node, path, kernels)
            modules |= {alias.asname or alias.name for alias in node.names
                        if module_file(f"{source}.{alias.name}", kernels) is not None}
        elif isinstance(node, ast.Import):
            modules |= {alias.asname for alias in node.names if alias.asname and module_file(alias.name, kernels)}
    return [f"{path.relative_to(kernels.parent)}:{node.lineno}: reads the private name {node.attr} of module "
            f"{node.value.id}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and is_private(node.attr) and isinstance(node.value, ast.Name)
            and node.value.id in modules]


def core_import_problems(kernels: Path = KERNELS) -> list[str]:
    problems = []
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    siblings = {f"{PACKAGE}.{Path(name).stem}" for name in LEAF_CORE}
    for name in LEAF_CORE:
        path = kernels / name
        for line, module, _ in imports(ast.parse(path.read_text()), path, kernels):
            if module.split(".")[0] not in allowed and module not in siblings:
                problems.append(f"kernels/{name}:{line}: imports {module}; it may import only torch, the standard "
                                f"library and {sorted(LEAF_CORE)}")
    return problems


# -- the tests --------------------------------------------------------------------------------------

def test_every_registered_backend_has_the_same_file_roles():
    assert len(registry()) >= 3
    assert role_problems() == []


def test_kernels_import_only_leaf_modules_of_mfa_hf():
    assert mfa_import_problems() == []


def test_no_private_name_crosses_a_module_boundary():
    assert private_import_problems() == []


def test_contract_and_launch_import_only_torch_and_the_standard_library():
    assert core_import_problems() == []


# -- each check fails on a planted violation (a copy of the tree, changed) --------------------------

@pytest.fixture
def tree_copy(tmp_path):
    import shutil

    shutil.copytree(KERNELS, tmp_path / "kernels", ignore=shutil.ignore_patterns("*.metal", "*.h", "__pycache__",
                                                                                 "include", "examples", "runtime"))
    (tmp_path / "mfa_hf").mkdir()
    shutil.copy(ROOT / "mfa_hf" / "dispatch.py", tmp_path / "mfa_hf" / "dispatch.py")
    return tmp_path


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_checks_pass_on_the_unchanged_copy(tree_copy):
    assert role_problems(tree_copy) == []
    assert mfa_import_problems(tree_copy / "kernels") == []
    assert private_import_problems(tree_copy / "kernels") == []
    assert core_import_problems(tree_copy / "kernels") == []


@pytest.mark.parametrize("plant", ["missing_role_file", "launcher_in_backend", "launcher_renamed"])
def test_role_check_fails_on_a_planted_violation(tree_copy, plant):
    torch_folder = tree_copy / "kernels" / "torch"
    if plant == "missing_role_file":
        (torch_folder / "decode.py").unlink()
    elif plant == "launcher_in_backend":
        _append(torch_folder / "backend.py", "\n\ndef forward(call):\n    return None\n")
    else:
        source = (torch_folder / "backward.py").read_text()
        (torch_folder / "backward.py").write_text(source.replace("def backward(", "def backward_call("))
    assert role_problems(tree_copy)


@pytest.mark.parametrize("line", ["from mfa_hf import ops\n", "import mfa_hf.dispatch\n",
                                  "from mfa_hf.kvcache import append\n", "from ... import api\n",
                                  "def f():\n    import mfa_hf\n"])
def test_mfa_import_check_fails_on_a_planted_violation(tree_copy, line):
    _append(tree_copy / "kernels" / "metal" / "decode.py", "\n" + line)
    assert mfa_import_problems(tree_copy / "kernels")


@pytest.mark.parametrize("line", ["from .loader import _compile\n", "from mfa_hf.kernels.launch import _x\n",
                                  "from mfa_hf.problem import _private\n", "from . import loader\nloader._libraries\n",
                                  "import mfa_hf.kernels.metal.loader as lib\nlib._compile\n"])
def test_private_import_check_fails_on_a_planted_violation(tree_copy, line):
    _append(tree_copy / "kernels" / "metal" / "append.py", "\n" + line)
    assert private_import_problems(tree_copy / "kernels")


@pytest.mark.parametrize("line", ["from mfa_hf import problem\n", "import numpy\n", "from .dropout import keep_mask\n"])
def test_core_import_check_fails_on_a_planted_violation(tree_copy, line):
    _append(tree_copy / "kernels" / "launch.py", "\n" + line)
    assert core_import_problems(tree_copy / "kernels")
