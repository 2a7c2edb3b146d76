"""Where the zoo keeps fetched packages and built zoos."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$FUSIONLANG_CACHE``, else ``$XDG_CACHE_HOME/fusionlang``
    (``~/.cache/fusionlang``)."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("FUSIONLANG_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fusionlang"


def packages_dir(cache: str | os.PathLike | None = None) -> Path:
    return cache_dir(cache) / "packages"


def zoo_root(cache: str | os.PathLike | None = None) -> Path:
    return cache_dir(cache) / "zoo"


def zoo_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    return zoo_root(cache) / name
