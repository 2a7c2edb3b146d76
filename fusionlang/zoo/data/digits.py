"""scikit-learn's bundled handwritten digits (8x8, 1,797 images; ``load_digits``):
which digit? Pixel values 0..16 are scaled to 0..255."""

from __future__ import annotations

from ..errors import MissingPackageError
from ..fetch import PIP_INSTALL
from .base import ImageDataset, ImageSplit, stratified_parts

CLASS_NAMES = tuple(str(d) for d in range(10))


def load_digits(n_train=80, n_val=20, n_test=60, seed=0, cache=None, fetch=None) -> ImageDataset:
    import numpy as np

    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError:
        raise MissingPackageError("Python package scikit-learn", PIP_INSTALL["sklearn"]) from None
    d = _sk_digits()
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    labels = d.target.tolist()
    tr, va, te = stratified_parts(labels, (n_train, n_val, n_test), f"digits/{seed}", 10)

    def mk(idx):
        return ImageSplit(np.ascontiguousarray(images[idx][:, None]), tuple(labels[i] for i in idx))

    return ImageDataset("digits", CLASS_NAMES, mk(tr), mk(va), mk(te),
                        source="scikit-learn: load_digits (bundled)")
