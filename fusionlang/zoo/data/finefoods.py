"""Amazon fine-food reviews: ``small_fine_foods`` of the R package modeldata
(Debian ``r-cran-modeldata``). Task: is the review score "great" (5 stars) or "other"?
The package's own ``training_data`` / ``testing_data`` split is kept: train and val come
from ``training_data`` (4,000 reviews), test from ``testing_data`` (1,000)."""

from __future__ import annotations

import re

from ..fetch import find_deb
from ..rdata import LazyLoadDB, as_columns
from .base import TextDataset, make_text_dataset

CLASS_NAMES = ("other", "great")
_TAG = re.compile(r"<[^>]+>")
_WS = re.compile(r"\s+")


def clean_review(text: str) -> str:
    return _WS.sub(" ", _TAG.sub(" ", text)).strip()


def read_fine_foods(cache=None, fetch=None) -> dict[str, tuple[list[str], list[int]]]:
    """``{"train": (texts, labels), "test": (texts, labels)}`` as shipped."""
    root = find_deb("r-cran-modeldata", cache, fetch)
    db = LazyLoadDB(root / "data" / "Rdata")
    out = {}
    for split, obj in (("train", "training_data"), ("test", "testing_data")):
        cols = as_columns(db[obj])
        texts = [clean_review(t or "") for t in cols["review"]]
        labels = [CLASS_NAMES.index(s) for s in cols["score"]]
        out[split] = (texts, labels)
    return out


def load_finefoods(n_train=300, n_val=50, n_test=300, seed=0, cache=None, fetch=None) -> TextDataset:
    data = read_fine_foods(cache, fetch)
    (tt, ty), (st, sy) = data["train"], data["test"]
    return make_text_dataset(
        "finefoods", CLASS_NAMES, tt, ty, (n_train, n_val, n_test), seed,
        source="r-cran-modeldata: small_fine_foods (training_data / testing_data)",
        test_texts=st, test_labels=sy,
    )
