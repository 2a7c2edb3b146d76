"""Frozen data set containers and deterministic stratified splits."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TextSplit:
    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise ValueError("texts and labels differ in length")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TextDataset:
    """A text classification data set with fixed train/val/test splits."""

    name: str
    class_names: tuple[str, ...]
    train: TextSplit
    val: TextSplit
    test: TextSplit
    source: str  # where the data came from (package + object), for the manifest

    def split(self, name: str) -> TextSplit:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r} (expected one of {', '.join(SPLITS)})")
        return getattr(self, name)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True, eq=False)
class ImageSplit:
    images: Any  # numpy uint8 array (N, C, H, W), read-only
    labels: tuple[int, ...]

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise ValueError("images and labels differ in length")
        try:
            self.images.setflags(write=False)
        except AttributeError:  # not a numpy array
            pass

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An image classification data set with fixed train/val/test splits."""

    name: str
    class_names: tuple[str, ...]
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    source: str

    def split(self, name: str) -> ImageSplit:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r} (expected one of {', '.join(SPLITS)})")
        return getattr(self, name)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def stratified_parts(
    labels: Sequence[int], sizes: Sequence[int], seed: int | str, num_classes: int | None = None
) -> list[list[int]]:
    """Disjoint index lists, one per entry of ``sizes`` (examples *per class*).

    Each class's indices are shuffled with a generator seeded from ``seed`` and the class
    id, then cut into consecutive parts. A class with fewer examples than ``sum(sizes)``
    has every part scaled down in proportion (parts stay disjoint). The result depends
    only on ``labels``, ``sizes`` and ``seed``. Parts are sorted by (class-interleaved)
    shuffled order so that batches mix classes.
    """
    if num_classes is None:
        num_classes = max(labels) + 1 if len(labels) else 0
    by_class: list[list[int]] = [[] for _ in range(num_classes)]
    for i, y in enumerate(labels):
        by_class[y].append(i)
    parts: list[list[int]] = [[] for _ in sizes]
    total = sum(sizes)
    for c, idx in enumerate(by_class):
        rng = random.Random(f"{seed}/{c}")
        rng.shuffle(idx)
        if len(idx) >= total:
            counts = list(sizes)
        else:
            counts = [len(idx) * s // total if total else 0 for s in sizes]
        start = 0
        for p, n in enumerate(counts):
            parts[p].extend(idx[start : start + n])
            start += n
    for p, part in enumerate(parts):
        random.Random(f"{seed}/order/{p}").shuffle(part)
    return parts


def make_text_dataset(
    name: str,
    class_names: Sequence[str],
    texts: Sequence[str],
    labels: Sequence[int],
    sizes: Sequence[int],
    seed: int,
    source: str,
    test_texts: Sequence[str] | None = None,
    test_labels: Sequence[int] | None = None,
) -> TextDataset:
    """Split a pool into train/val/test (per-class ``sizes``). With ``test_texts`` the
    test split is drawn from that separate pool (the source's own test set)."""
    k = len(class_names)
    if test_texts is None:
        tr, va, te = stratified_parts(labels, sizes, f"{name}/{seed}", k)
        test_pool_t, test_pool_y = texts, labels
    else:
        tr, va = stratified_parts(labels, sizes[:2], f"{name}/{seed}", k)
        (te,) = stratified_parts(test_labels, sizes[2:3], f"{name}/{seed}/test", k)
        test_pool_t, test_pool_y = test_texts, test_labels

    def mk(idx, t, y):
        return TextSplit(tuple(t[i] for i in idx), tuple(int(y[i]) for i in idx))

    return TextDataset(
        name=name,
        class_names=tuple(class_names),
        train=mk(tr, texts, labels),
        val=mk(va, texts, labels),
        test=mk(te, test_pool_t, test_pool_y),
        source=source,
    )
