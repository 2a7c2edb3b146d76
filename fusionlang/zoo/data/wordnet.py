"""WordNet noun categories (Debian ``wordnet-base``): the lexicographer file
("supersense") of a noun, e.g. ``noun.animal`` or ``noun.food``, from the noun alone.
Only lower-case lemmas whose senses all fall in one of the kept categories are used."""

from __future__ import annotations

from collections import defaultdict

from ..fetch import find_deb
from .base import TextDataset, make_text_dataset

# lexicographer file numbers (see lexnames(5WN))
CATEGORIES = {
    5: "animal",
    6: "artifact",
    8: "body",
    13: "food",
    15: "location",
    18: "person",
    20: "plant",
    27: "substance",
}
CLASS_NAMES = tuple(CATEGORIES.values())


def read_noun_categories(cache=None, fetch=None) -> dict[str, set[int]]:
    """``{lemma: {lexicographer file numbers of its senses}}`` from ``data.noun``."""
    path = find_deb("wordnet-base", cache, fetch) / "data.noun"
    senses: dict[str, set[int]] = defaultdict(set)
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # license header
                continue
            parts = line.split(" ", 4 + 2 * 64)
            lex = int(parts[1])
            n = int(parts[3], 16)
            for j in range(n):
                senses[parts[4 + 2 * j]].add(lex)
    return senses


def load_wordnet(n_train=150, n_val=30, n_test=100, seed=0, cache=None, fetch=None) -> TextDataset:
    senses = read_noun_categories(cache, fetch)
    cats = list(CATEGORIES)
    words, labels = [], []
    for lemma in sorted(senses):
        lex = senses[lemma]
        if len(lex) == 1 and lemma.islower() and lemma.replace("_", "").replace("-", "").isalpha():
            (c,) = lex
            if c in CATEGORIES:
                words.append(lemma.replace("_", " "))
                labels.append(cats.index(c))
    return make_text_dataset(
        "wordnet", CLASS_NAMES, words, labels, (n_train, n_val, n_test), seed,
        source="wordnet-base: data.noun lexicographer files",
    )
