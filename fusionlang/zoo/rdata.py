"""A small pure-Python reader for R's serialization format (XDR, versions 2 and 3).

It reads what R packages ship their data in:

- ``*.rds`` files (``saveRDS``: gzip/bzip2/xz-compressed or plain serialization),
- lazy-load databases ``Rdata.rdb`` + ``Rdata.rdx`` (``data/`` of an installed package):
  the ``.rdx`` index is an RDS file holding ``variables`` (name -> (offset, length)),
  and each blob of the ``.rdb`` is ``4-byte big-endian length`` + zlib (or ``Z``/``2``
  + xz/bzip2) compressed serialization of one object.

R values map onto Python values:

- atomic vectors (logical, integer, double, character) -> :class:`RVector` (a ``list``
  subclass with ``.attributes``); ``NA`` becomes ``None``;
- lists (``VECSXP``) -> :class:`RList` (a ``list`` subclass with ``.attributes``);
- data frames / tibbles are lists with a ``names`` and ``class`` attribute; use
  :func:`as_columns` to get a ``{name: list}`` dict, decoding factors to their labels;
- pairlists -> :class:`RPairList` (a list of ``(tag, value)``);
- symbols -> :class:`RSymbol`; environments and closures are read (so that a blob that
  holds one does not abort the read) but not interpreted.

Only what data sets need is supported; byte code and external pointers raise
:class:`RDataError`.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "LazyLoadDB",
    "RDataError",
    "REnvironment",
    "RList",
    "RPairList",
    "RSymbol",
    "RVector",
    "as_columns",
    "r_class",
    "read_rds",
    "unserialize",
]

NA_INTEGER = -(2**31)

# SEXP types
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP = 7, 8, 9, 10
INTSXP, REALSXP, CPLXSXP, STRSXP, DOTSXP = 13, 14, 15, 16, 17
VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP, RAWSXP, S4SXP = 19, 20, 21, 22, 23, 24, 25
# pseudo types of the serialization format
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP = 255, 254, 253, 252
MISSINGARG_SXP, BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP = 251, 250, 249, 248
PERSISTSXP, CLASSREFSXP, GENERICREFSXP, BCREPDEF = 247, 246, 245, 244
EMPTYENV_SXP, BASEENV_SXP, ATTRLANGSXP, ATTRLISTSXP, ALTREP_SXP = 242, 241, 240, 239, 238

IS_OBJECT_BIT = 1 << 8
HAS_ATTR_BIT = 1 << 9
HAS_TAG_BIT = 1 << 10


class RDataError(ValueError):
    """The bytes are not an R serialization this reader understands."""


class RVector(list):
    """An R atomic vector (or character vector); ``NA`` is ``None``."""

    def __init__(self, values=(), rtype: str = "", attributes: dict | None = None):
        super().__init__(values)
        self.rtype = rtype
        self.attributes: dict[str, Any] = attributes or {}


class RList(list):
    """An R generic vector (``list()``, data frames, tibbles)."""

    def __init__(self, values=(), attributes: dict | None = None):
        super().__init__(values)
        self.attributes: dict[str, Any] = attributes or {}


class RPairList(list):
    """An R pairlist / language object: a list of ``(tag, value)``."""

    def __init__(self, values=(), kind: str = "pairlist", attributes: dict | None = None):
        super().__init__(values)
        self.kind = kind
        self.attributes: dict[str, Any] = attributes or {}


@dataclass(frozen=True)
class RSymbol:
    name: str


@dataclass(eq=False)
class REnvironment:
    kind: str = "env"
    frame: Any = None
    attributes: dict = field(default_factory=dict)


@dataclass(eq=False)
class ROpaque:
    """A value read but not interpreted (closures, promises, S4 objects...)."""

    kind: str
    parts: tuple = ()
    attributes: dict = field(default_factory=dict)


_SPECIAL_ENVS = {
    GLOBALENV_SXP: "R_GlobalEnv",
    EMPTYENV_SXP: "R_EmptyEnv",
    BASEENV_SXP: "R_BaseEnv",
    BASENAMESPACE_SXP: "R_BaseNamespace",
}


class _Reader:
    def __init__(self, data: bytes, persistent_hook=None):
        self.buf = memoryview(data)
        self.pos = 0
        self.refs: list[Any] = []
        self.persistent_hook = persistent_hook

    # -- primitives -------------------------------------------------------------------
    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise RDataError("truncated R serialization")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def ints(self, n: int) -> list:
        return list(struct.unpack(f">{n}i", self._take(4 * n))) if n else []

    def doubles(self, n: int) -> list:
        return list(struct.unpack(f">{n}d", self._take(8 * n))) if n else []

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    # -- header ------------------------------------------------------------------------
    def header(self) -> None:
        fmt = bytes(self._take(2))
        if fmt != b"X\n":
            if fmt[:1] in (b"A", b"B"):
                raise RDataError("only XDR (binary, big-endian) R serialization is supported")
            raise RDataError(f"not an R serialization (starts with {fmt!r})")
        version = self.int()
        self.int()  # writer R version
        self.int()  # minimal reader R version
        if version == 3:
            nelen = self.int()
            self._take(nelen)  # native encoding
        elif version != 2:
            raise RDataError(f"unsupported R serialization version {version}")

    # -- items -------------------------------------------------------------------------
    def item(self) -> Any:
        flags = self.int()
        t = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & HAS_ATTR_BIT)
        has_tag = bool(flags & HAS_TAG_BIT)

        if t == NILVALUE_SXP:
            return None
        if t in _SPECIAL_ENVS:
            return REnvironment(kind=_SPECIAL_ENVS[t])
        if t in (UNBOUNDVALUE_SXP, MISSINGARG_SXP):
            return None
        if t == REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            return self.refs[idx - 1]
        if t == PERSISTSXP:
            names = self._string_vec()
            value = self.persistent_hook(names) if self.persistent_hook else ROpaque("persist", tuple(names))
            self.refs.append(value)
            return value
        if t == SYMSXP:
            sym = RSymbol(self.item() or "")
            self.refs.append(sym)
            return sym
        if t in (NAMESPACESXP, PACKAGESXP):
            value = REnvironment(kind="namespace" if t == NAMESPACESXP else "package",
                                 frame=self._string_vec())
            self.refs.append(value)
            return value
        if t == ENVSXP:
            env = REnvironment()
            self.refs.append(env)
            self.int()  # locked
            self.item()  # enclosure
            env.frame = self.item()
            self.item()  # hash table
            attrs = self.item()
            env.attributes = _attr_dict(attrs)
            return env
        if t in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP):
            return self._pairlist(t, flags, has_attr, has_tag)
        if t == CHARSXP:
            n = self.int()
            if n == -1:
                return None
            raw = bytes(self._take(n))
            # levels: 1<<2 LATIN1, 1<<3 UTF8, 1<<6 ASCII
            enc = "latin-1" if levels & 4 else "utf-8"
            return raw.decode(enc, errors="replace")
        if t in (LGLSXP, INTSXP):
            n = self.length()
            vals = [None if v == NA_INTEGER else (bool(v) if t == LGLSXP else v) for v in self.ints(n)]
            vec = RVector(vals, "logical" if t == LGLSXP else "integer")
        elif t == REALSXP:
            n = self.length()
            vec = RVector(self.doubles(n), "double")
        elif t == CPLXSXP:
            n = self.length()
            d = self.doubles(2 * n)
            vec = RVector([complex(d[2 * i], d[2 * i + 1]) for i in range(n)], "complex")
        elif t == STRSXP:
            n = self.length()
            vec = RVector([self.item() for _ in range(n)], "character")
        elif t == RAWSXP:
            n = self.length()
            vec = RVector(bytes(self._take(n)), "raw")
        elif t in (VECSXP, EXPRSXP):
            n = self.length()
            vec = RList([self.item() for _ in range(n)])
        elif t == S4SXP:
            vec = ROpaque("S4")
        elif t == ALTREP_SXP:
            info = self.item()
            state = self.item()
            attr = self.item()
            out = _altrep(info, state)
            if attr is not None:
                out.attributes = _attr_dict(attr)
            return out
        elif t in (BCODESXP, EXTPTRSXP, WEAKREFSXP, SPECIALSXP, BUILTINSXP):
            if t in (SPECIALSXP, BUILTINSXP):
                n = self.int()
                return ROpaque("builtin", (bytes(self._take(n)).decode(),))
            raise RDataError(f"R object of SEXP type {t} (byte code / pointers) is not supported")
        else:
            raise RDataError(f"unknown SEXP type {t} at byte {self.pos - 4}")
        if has_attr:
            vec.attributes = _attr_dict(self.item())
        return vec

    def _string_vec(self) -> list:
        if self.int() != 0:
            raise RDataError("names in persistent strings are not supported")
        n = self.int()
        return [self.item() for _ in range(n)]

    def _pairlist(self, t, flags, has_attr, has_tag):
        # Iterative over the CDR chain so that long pairlists don't recurse deeply.
        kind = {LISTSXP: "pairlist", LANGSXP: "call", CLOSXP: "closure", PROMSXP: "promise",
                DOTSXP: "dots", ATTRLANGSXP: "call", ATTRLISTSXP: "pairlist"}[t]
        out = RPairList(kind=kind)
        first_attr = None
        while True:
            attr = self.item() if has_attr else None
            if first_attr is None and attr is not None:
                first_attr = attr
            tag = self.item() if has_tag else None
            car = self.item()
            out.append((tag.name if isinstance(tag, RSymbol) else tag, car))
            flags = self.int()
            t = flags & 0xFF
            if t in (LISTSXP, ATTRLISTSXP) and kind in ("pairlist", "dots"):
                has_attr = bool(flags & HAS_ATTR_BIT)
                has_tag = bool(flags & HAS_TAG_BIT)
                continue
            # Not a plain continuation: push the flags back and read the CDR as an item.
            self.pos -= 4
            cdr = self.item()
            if cdr is not None:
                out.append((None, cdr))
            break
        if first_attr is not None:
            out.attributes = _attr_dict(first_attr)
        return out


def _attr_dict(attrs) -> dict:
    if attrs is None:
        return {}
    if isinstance(attrs, RPairList):
        return {tag: value for tag, value in attrs}
    return {}


def _altrep(info, state):
    cls = info[0][1].name if isinstance(info, RPairList) and isinstance(info[0][1], RSymbol) else ""
    if cls == "compact_intseq":
        n, start, inc = state
        return RVector([int(start + i * inc) for i in range(int(n))], "integer")
    if cls == "compact_realseq":
        n, start, inc = state
        return RVector([float(start + i * inc) for i in range(int(n))], "double")
    if cls.startswith("wrap_"):
        inner = state[0]
        return RVector(inner, getattr(inner, "rtype", "")) if isinstance(inner, RVector) else inner
    if cls == "deferred_string":
        arg = state[0][1] if isinstance(state, RPairList) else state
        return RVector(["NA" if v is None else _num_str(v) for v in arg], "character")
    raise RDataError(f"unsupported ALTREP class {cls!r}")


def _num_str(v) -> str:
    if isinstance(v, float) and v.is_integer() and not math.isinf(v):
        return str(int(v))
    return str(v)


# Decoding needs a dictionary at least as large as the encoder's (preset 6: 8 MiB).
_R_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9}]


def _decompress(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def unserialize(data: bytes, persistent_hook=None) -> Any:
    """Unserialize one R object from (already decompressed) serialization bytes."""
    r = _Reader(data, persistent_hook)
    r.header()
    return r.item()


def read_rds(path: str | Path) -> Any:
    """Read an ``.rds`` file (any of R's compressions)."""
    return unserialize(_decompress(Path(path).read_bytes()))


class LazyLoadDB:
    """A lazy-load database (``X.rdb`` + ``X.rdx``), e.g. ``<pkg>/data/Rdata``."""

    def __init__(self, base: str | Path):
        base = Path(base)
        if base.suffix in (".rdb", ".rdx"):
            base = base.with_suffix("")
        self.rdb = base.with_suffix(".rdb")
        self.rdx = base.with_suffix(".rdx")
        if not self.rdx.exists() or not self.rdb.exists():
            raise FileNotFoundError(f"lazy-load database not found: {self.rdb} / {self.rdx}")
        index = read_rds(self.rdx)
        idx = dict(zip(index.attributes["names"], index))
        self._variables = _named(idx["variables"])
        self._references = _named(idx.get("references"))
        self._blob = self.rdb.read_bytes()
        self._env_cache: dict[str, Any] = {}

    def names(self) -> list[str]:
        return list(self._variables)

    def __contains__(self, name: str) -> bool:
        return name in self._variables

    def _read_blob(self, key) -> Any:
        offset, length = int(key[0]), int(key[1])
        raw = self._blob[offset : offset + length]
        if len(raw) < 5:
            raise RDataError("bad lazy-load blob")
        ulen = struct.unpack(">I", raw[:4])[0]
        kind = raw[4:5]
        if kind == b"Z":  # raw LZMA2 stream (R's R_compress3, preset 6)
            data = lzma.decompress(bytes(raw[5:]), format=lzma.FORMAT_RAW, filters=_R_LZMA_FILTERS)
        elif kind == b"2":  # bzip2
            data = bz2.decompress(raw[5:])
        elif kind == b"0":  # stored
            data = raw[5:]
        else:
            data = zlib.decompress(raw[4:])
        if len(data) != ulen:
            raise RDataError("lazy-load blob length mismatch")
        return unserialize(data, persistent_hook=self._persistent)

    def _persistent(self, names):
        name = names[0]
        if name not in self._env_cache:
            env = REnvironment(kind="lazy")
            self._env_cache[name] = env
            if name in self._references:
                env.frame = self._read_blob(self._references[name])
        return self._env_cache[name]

    def get(self, name: str) -> Any:
        if name not in self._variables:
            raise KeyError(f"{name!r} not in {self.rdb} (has: {', '.join(self.names())})")
        return self._read_blob(self._variables[name])

    __getitem__ = get


def _named(lst) -> dict:
    if lst is None:
        return {}
    names = lst.attributes.get("names") or []
    return dict(zip(names, lst))


def r_class(obj) -> list[str]:
    attrs = getattr(obj, "attributes", {}) or {}
    return list(attrs.get("class") or [])


def as_columns(df) -> dict[str, list]:
    """A data frame / tibble as ``{column: values}``; factors become their labels."""
    if not isinstance(df, RList):
        raise RDataError(f"not a data frame: {type(df).__name__}")
    names = df.attributes.get("names")
    if names is None:
        raise RDataError("data frame without names")
    out = {}
    for name, col in zip(names, df):
        if isinstance(col, RVector) and "factor" in r_class(col):
            levels = col.attributes.get("levels") or []
            col = [None if v is None else levels[v - 1] for v in col]
        out[name] = list(col)
    return out
