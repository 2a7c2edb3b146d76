"""Word-level tasks from the R package tidytext (Debian ``r-cran-tidytext``):

- ``sentiment``: the Bing Liu opinion lexicon (``sentiments``): is a word positive or
  negative? Words listed with both labels are dropped.
- ``pos``: ``parts_of_speech`` (Moby project): the part of speech of a word, among words
  that have exactly one of the kept parts of speech.
"""

from __future__ import annotations

from collections import defaultdict

from ..fetch import find_deb
from ..rdata import LazyLoadDB, as_columns
from .base import TextDataset, make_text_dataset

SENTIMENT_CLASSES = ("negative", "positive")
POS_CLASSES = ("Noun", "Verb", "Adjective", "Adverb")


def _db(cache, fetch) -> LazyLoadDB:
    return LazyLoadDB(find_deb("r-cran-tidytext", cache, fetch) / "data" / "Rdata")


def _unambiguous(words, tags, classes) -> tuple[list[str], list[int]]:
    seen: dict[str, set] = defaultdict(set)
    for w, t in zip(words, tags):
        if w is not None and t is not None:
            seen[w].add(t)
    out_w, out_y = [], []
    for w in sorted(seen):
        ts = seen[w]
        if len(ts) == 1:
            (t,) = ts
            if t in classes:
                out_w.append(w)
                out_y.append(classes.index(t))
    return out_w, out_y


def load_sentiment(n_train=500, n_val=100, n_test=300, seed=0, cache=None, fetch=None) -> TextDataset:
    cols = as_columns(_db(cache, fetch)["sentiments"])
    words, labels = _unambiguous(cols["word"], cols["sentiment"], SENTIMENT_CLASSES)
    return make_text_dataset(
        "sentiment", SENTIMENT_CLASSES, words, labels, (n_train, n_val, n_test), seed,
        source="r-cran-tidytext: sentiments (Bing Liu opinion lexicon)",
    )


def load_pos(n_train=300, n_val=50, n_test=200, seed=0, cache=None, fetch=None) -> TextDataset:
    cols = as_columns(_db(cache, fetch)["parts_of_speech"])
    # multi-word entries and capitalised names are dropped: single common words only
    # the three verb tags (transitive, intransitive, usu participle) count as one
    pairs = [(w, "Verb" if p and p.startswith("Verb") else p)
             for w, p in zip(cols["word"], cols["pos"]) if w and w.isalpha() and w.islower()]
    words, labels = _unambiguous([w for w, _ in pairs], [p for _, p in pairs], POS_CLASSES)
    return make_text_dataset(
        "pos", POS_CLASSES, words, labels, (n_train, n_val, n_test), seed,
        source="r-cran-tidytext: parts_of_speech (Moby), single-POS words",
    )
