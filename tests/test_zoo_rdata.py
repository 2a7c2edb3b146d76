"""The pure-Python R serialization reader, on hand-made XDR bytes and on real packages."""

from __future__ import annotations

import gzip
import struct
import zlib

import pytest

from fusionlang.zoo.rdata import (
    LazyLoadDB,
    RDataError,
    RList,
    RVector,
    as_columns,
    r_class,
    read_rds,
    unserialize,
)

# -- a tiny XDR writer, enough to produce known R objects -------------------------------


def _i(*v):
    return struct.pack(f">{len(v)}i", *v)


def _flags(t, obj=False, attr=False, tag=False, levels=0):
    return _i(t | (obj << 8) | (attr << 9) | (tag << 10) | (levels << 12))


def _charsxp(s):
    if s is None:
        return _i(9, -1)
    b = s.encode()
    return _flags(9, levels=8) + _i(len(b)) + b


def _strsxp(vals, attrs=b""):
    return _flags(16, attr=bool(attrs)) + _i(len(vals)) + b"".join(_charsxp(v) for v in vals) + attrs


def _intsxp(vals, attrs=b"", obj=False):
    body = _i(*[(-(2**31) if v is None else v) for v in vals])
    return _flags(13, obj=obj, attr=bool(attrs)) + _i(len(vals)) + body + attrs


def _realsxp(vals):
    return _flags(14) + _i(len(vals)) + struct.pack(f">{len(vals)}d", *vals)


_SYM_CACHE: dict = {}


def _sym(name, refs):
    if name in refs:
        return _i(255 | (refs[name] << 8))  # REFSXP
    refs[name] = len(refs) + 1
    return _flags(1) + _charsxp(name)


def _attrs(pairs, refs):
    out = b""
    for tag, value in pairs:
        out += _flags(2, tag=True) + _sym(tag, refs) + value
    return out + _i(254)  # NILVALUE


def _header(version=3):
    h = b"X\n" + _i(version, 0x040201, 0x030500)
    if version == 3:
        h += _i(5) + b"UTF-8"
    return h


def _data_frame():
    refs: dict = {}
    factor = _intsxp([2, 1, None], obj=True, attrs=_attrs(
        [("levels", _strsxp(["great", "other"])), ("class", _strsxp(["factor"]))], refs))
    cols = [_strsxp(["a", None, "c"]), _realsxp([1.5, 2.0, -3.0]), factor]
    attrs = _attrs([
        ("names", _strsxp(["text", "x", "score"])),
        ("row.names", _intsxp([None, -3])),
        ("class", _strsxp(["tbl_df", "tbl", "data.frame"])),
    ], refs)
    return _flags(19, obj=True, attr=True) + _i(3) + b"".join(cols) + attrs


def test_unserialize_known_data_frame():
    df = unserialize(_header(3) + _data_frame())
    assert isinstance(df, RList)
    assert r_class(df) == ["tbl_df", "tbl", "data.frame"]
    cols = as_columns(df)
    assert cols == {"text": ["a", None, "c"], "x": [1.5, 2.0, -3.0], "score": ["other", "great", None]}


def test_unserialize_version_2_and_vectors():
    vec = unserialize(_header(2) + _intsxp([1, None, 3]))
    assert isinstance(vec, RVector) and vec.rtype == "integer" and list(vec) == [1, None, 3]
    assert unserialize(_header(2) + _i(254)) is None  # NULL


def test_compact_intseq_altrep():
    refs: dict = {}
    info = (_flags(2) + _sym("compact_intseq", refs)
            + _flags(2) + _sym("base", refs) + _flags(2) + _intsxp([13]) + _i(254))
    state = _realsxp([4.0, 10.0, 1.0])
    blob = _header(3) + _i(238) + info + state + _i(254)
    assert list(unserialize(blob)) == [10, 11, 12, 13]


def test_rejects_non_xdr():
    with pytest.raises(RDataError):
        unserialize(b"A\n1\n")
    with pytest.raises(RDataError):
        unserialize(b"RDX2\n")


def test_rds_gzip_and_lazyload_db(tmp_path):
    obj = _header(3) + _data_frame()
    (tmp_path / "x.rds").write_bytes(gzip.compress(obj))
    assert as_columns(read_rds(tmp_path / "x.rds"))["x"] == [1.5, 2.0, -3.0]
    # a lazy-load DB with one variable, zlib blob; index is a named list of (offset, len)
    blob = struct.pack(">I", len(obj)) + zlib.compress(obj)
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    refs: dict = {}
    key = _intsxp([0, len(blob)])
    variables = (_flags(19, attr=True) + _i(1) + key
                 + _attrs([("names", _strsxp(["training_data"]))], refs))
    index = (_flags(19, attr=True) + _i(3) + variables + _i(254) + _flags(10) + _i(1, 1)
             + _attrs([("names", _strsxp(["variables", "references", "compressed"]))], refs))
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_header(2) + index))
    db = LazyLoadDB(tmp_path / "Rdata")
    assert db.names() == ["training_data"]
    assert as_columns(db["training_data"])["score"] == ["other", "great", None]
    with pytest.raises(KeyError):
        db["nope"]


def test_real_modeldata_package():
    from fusionlang.zoo.testing import require

    root = require("deb", "r-cran-modeldata")
    db = LazyLoadDB(root / "data" / "Rdata")
    assert {"training_data", "testing_data"} <= set(db.names())
    cols = as_columns(db["testing_data"])
    assert set(cols) >= {"review", "score"}
    assert len(cols["review"]) == 1000
    assert set(cols["score"]) == {"great", "other"}


def test_real_tidytext_xz_blobs():
    from fusionlang.zoo.testing import require

    root = require("deb", "r-cran-tidytext")
    cols = as_columns(LazyLoadDB(root / "data" / "Rdata")["sentiments"])
    assert set(cols["sentiment"]) == {"positive", "negative"}
    assert "abnormal" in cols["word"]
