"""The kernel core, installed as `mfa_hf.kernels`.

In a source checkout this folder sits at the repository root, where `python -c`, `python -m` or a REPL started
there put it on sys.path as a top-level `kernels`: the name of PyPI's `kernels` package, which transformers
(>= 5.25) installs and imports. Imported under that name, this module hands the import to the installed
package (or fails as if there were no `kernels`), so transformers works from a checkout too.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError(f"No module named 'kernels' (only mfa-hf's kernel folder {os.path.dirname(__file__)}, "
                                  "which is imported as mfa_hf.kernels)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # what `import kernels` returns once this file has run
    _spec.loader.exec_module(_module)
