"""fusionlang: a declarative language and compiler for deep model fusion.

The Python API (``fusionlang.check``, ``compile``, ``run``, ``load``; errors raise
``fusionlang.FuseErrors``) lives in :mod:`fusionlang.api` and is imported on first use:
``import fusionlang`` itself loads neither torch nor transformers. See docs/api.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

__version__ = "0.1.0"

__all__ = ["FuseErrors", "RunResult", "__version__", "check", "compile", "load", "run"]

_API = ("check", "compile", "run", "load", "RunResult")


def __getattr__(name: str):
    """Lazy re-exports: the API functions import the compiler (and torch) only when used.

    NOTE: through importlib, so the package itself imports none of its modules (they
    import `fusionlang.ir` and friends, and the package stays out of their import graph)."""
    import importlib

    if name in _API:
        return getattr(importlib.import_module("fusionlang.api"), name)
    if name == "FuseErrors":
        return importlib.import_module("fusionlang.lang.diagnostics").FuseErrors
    raise AttributeError(f"module 'fusionlang' has no attribute {name!r}")


class _CheckoutResources:
    """Import hook for running from a source checkout (`python -m fusionlang` in the
    repository root after a non-editable `pip install .`): the checkout's `fusionlang/`
    shadows the installed one, and its grammar/ and stdlib/ live at the repository root,
    where the wheel maps them to `fusionlang.grammar` / `fusionlang.stdlib`. Consulted
    after every other finder, so an installed or editable mapping always wins."""

    NAMES = ("fusionlang.grammar", "fusionlang.stdlib")

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, name, path=None, target=None):
        if name not in self.NAMES:
            return None
        import importlib.util

        d = self.root / name.split(".", 1)[1]
        init = d / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(d)])


def _install_checkout_hook() -> None:
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "grammar" / "fuse.lark").is_file() \
            and not any(isinstance(f, _CheckoutResources) for f in sys.meta_path):
        sys.meta_path.append(_CheckoutResources(root))


_install_checkout_hook()
