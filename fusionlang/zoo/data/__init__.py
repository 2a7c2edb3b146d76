"""One loader per data source. Each returns a frozen :class:`TextDataset` or
:class:`ImageDataset` with fixed train/val/test splits drawn from a seed.

Loaders are imported lazily: ``import fusionlang.zoo.data`` reads no data and imports
neither torch nor numpy."""

from __future__ import annotations

import importlib

from .base import ImageDataset, ImageSplit, TextDataset, TextSplit, stratified_parts

# task source name -> "module:function"
LOADERS = {
    "finefoods": "finefoods:load_finefoods",
    "austen": "austen:load_austen",
    "sentiment": "lexicon:load_sentiment",
    "pos": "lexicon:load_pos",
    "wordnet": "wordnet:load_wordnet",
    "spam": "spam:load_spam",
    "fashion": "fashion:load_fashion",
    "digits": "digits:load_digits",
}


def get_loader(source: str):
    if source not in LOADERS:
        raise KeyError(f"unknown data source {source!r} (known: {', '.join(sorted(LOADERS))})")
    mod, fn = LOADERS[source].split(":")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), fn)


def load(source: str, **kwargs):
    """``load("austen", n_train=100, seed=0)`` -> a data set."""
    return get_loader(source)(**kwargs)


__all__ = [
    "LOADERS",
    "ImageDataset",
    "ImageSplit",
    "TextDataset",
    "TextSplit",
    "get_loader",
    "load",
    "stratified_parts",
]
