"""Jane Austen novel attribution (Debian ``r-cran-janeaustenr``): which of the six
novels does a passage of ``words`` consecutive words come from? Passages are disjoint
windows over each novel's text (title lines and chapter headings dropped)."""

from __future__ import annotations

import re

from ..fetch import find_deb
from ..rdata import LazyLoadDB
from .base import TextDataset, make_text_dataset

NOVELS = (
    ("sensesensibility", "Sense & Sensibility"),
    ("prideprejudice", "Pride & Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)
CLASS_NAMES = tuple(title for _, title in NOVELS)
_HEADING = re.compile(r"^\s*(chapter|volume)\b|^\s*[IVXLC]+\.?\s*$", re.IGNORECASE)


def read_novels(cache=None, fetch=None) -> dict[str, list[str]]:
    """``{object name: lines}`` of the six novels."""
    root = find_deb("r-cran-janeaustenr", cache, fetch)
    db = LazyLoadDB(root / "data" / "Rdata")
    return {obj: [line or "" for line in db[obj]] for obj, _ in NOVELS}


def passages(lines: list[str], words: int, skip_lines: int = 10) -> list[str]:
    toks: list[str] = []
    for line in lines[skip_lines:]:
        if line.strip() and not _HEADING.match(line):
            toks.extend(line.split())
    return [" ".join(toks[i : i + words]) for i in range(0, len(toks) - words + 1, words)]


def load_austen(n_train=200, n_val=40, n_test=150, seed=0, words=24, cache=None, fetch=None) -> TextDataset:
    novels = read_novels(cache, fetch)
    texts: list[str] = []
    labels: list[int] = []
    for c, (obj, _) in enumerate(NOVELS):
        ps = passages(novels[obj], words)
        texts.extend(ps)
        labels.extend([c] * len(ps))
    return make_text_dataset(
        "austen", CLASS_NAMES, texts, labels, (n_train, n_val, n_test), seed,
        source=f"r-cran-janeaustenr: 6 novels, {words}-word passages",
    )
