"""Fashion-MNIST (Debian ``dataset-fashion-mnist``: the original idx files). Two kinds of
task: a subset of the 10 clothing classes, or the rotation (0/90/180/270 degrees) of an
image of any class. Train/val come from the 60,000 training images, test from the
10,000 test images."""

from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path

from ..fetch import find_deb
from .base import ImageDataset, ImageSplit, stratified_parts

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
ROTATIONS = ("0", "90", "180", "270")


def read_idx(path: Path):
    """An idx (MNIST) file as a numpy array."""
    import numpy as np

    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.lru_cache(maxsize=2)
def read_fashion(cache=None, fetch=None):
    """``{"train": (images [N,28,28] uint8, labels [N]), "test": (...)}``."""
    root = find_deb("dataset-fashion-mnist", cache, fetch)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        y = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        out[split] = (x, y)
    return out


def load_fashion(n_train=100, n_val=20, n_test=100, seed=0, classes=None, rotation=False,
                 name=None, cache=None, fetch=None) -> ImageDataset:
    """``classes``: names (or indices) of the clothing classes to keep, relabelled
    0..k-1 in the given order; ``rotation=True``: the task is the image's rotation."""
    import numpy as np

    data = read_fashion(cache, fetch)
    if rotation:
        class_names = ROTATIONS
        tag = name or "fashion-rotation"
    else:
        keep = [c if isinstance(c, int) else CLASSES.index(c) for c in (classes or range(10))]
        class_names = tuple(CLASSES[c] for c in keep)
        tag = name or "fashion"

    def pool(split):
        x, y = data[split]
        if rotation:
            # every image gets a rotation drawn from the seed; balanced over rotations
            rng = np.random.default_rng([seed, 1 if split == "train" else 2])
            labels = rng.permutation(np.arange(len(y)) % 4)
            return x, labels
        remap = {c: i for i, c in enumerate(keep)}
        idx = np.flatnonzero(np.isin(y, keep))
        return x[idx], np.array([remap[int(v)] for v in y[idx]])

    (xtr, ytr), (xte, yte) = pool("train"), pool("test")
    k = len(class_names)
    tr, va = stratified_parts(ytr.tolist(), (n_train, n_val), f"{tag}/{seed}", k)
    (te,) = stratified_parts(yte.tolist(), (n_test,), f"{tag}/{seed}/test", k)

    def mk(x, y, idx):
        imgs = x[idx]
        if rotation:
            imgs = np.stack([np.rot90(im, int(r)) for im, r in zip(imgs, y[idx])]) if len(idx) else imgs
        return ImageSplit(np.ascontiguousarray(imgs[:, None]), tuple(int(v) for v in y[idx]))

    what = "rotation (0/90/180/270)" if rotation else ", ".join(class_names)
    return ImageDataset(tag, class_names, mk(xtr, ytr, tr), mk(xtr, ytr, va), mk(xte, yte, te),
                        source=f"dataset-fashion-mnist: {what}")
