"""Fuzzing the front end with hypothesis: `check` and `fmt` never crash, every error is
located inside the file with a hint, and fmt is a meaning-preserving fixed point.

Inputs: random programs drawn from the productions of grammar/fuse.lark (hypothesis'
`from_lark`, with names, numbers and strings, incl. broken escapes, from small pools so
that references resolve), and byte-level mutations (deletions, insertions, duplications)
of the shipped specs in specs/ and stdlib/. Everything runs through the CLI's own `main`
(in-process), so an internal error shows as exit code 2.

A few hundred examples by default; `FUSIONLANG_FUZZ_LONG=1 pytest tests/test_fuzz.py`
runs thousands (the count is FUSIONLANG_FUZZ_EXAMPLES, default 3000 per test then).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import pytest
from conftest import REPO, run_cli

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.lark import from_lark
from lark import Lark

from fusionlang.lang.checker import check_file
from fusionlang.lang.diagnostics import FuseErrors
from fusionlang.lang.parser import parse

LONG = os.environ.get("FUSIONLANG_FUZZ_LONG") == "1"
EXAMPLES = int(os.environ.get("FUSIONLANG_FUZZ_EXAMPLES", "3000")) if LONG else 0
FUZZ = settings(max_examples=EXAMPLES or 100, deadline=None, database=None, derandomize=not LONG,
                suppress_health_check=list(HealthCheck))

# ---------------------------------------------------------------------- strategies
NAMES = ["a", "b", "m", "x", "y", "base", "experts", "e", "t", "f", "merging", "std",
         "sum", "mean", "lerp", "weighted", "ties", "dare", "task_arithmetic", "average", "trim", "drop",
         "local", "ramp", "layers", "slices", "tune", "classify", "model", "models", "merge", "let", "def",
         "on", "eval", "task", "use", "save", "bf16", "density", "scale", "weights", "_p", "Zz9"]
NUMBERS = ["0", "1", "2", "0.5", ".5", "1.", "3", "1e3", "1e-39", "1e39", "1e308", "1e999", "007", "4294967296"]
STRINGS = ['"a"', '""', '"models/base"', '"*.weight"', '"layers.{i}.*"', '"out"', r'"\N{foo}"', r'"\x4"',
           r'"\u12"', r'"\ud800"', r'"\u0000"', r'"\\"', r'"\n\t"', r'"\d"', r'"\U0001F600"', '"\u2028"',
           '"text"', '"é"', '"a\rb"', '"' + "x" * 300 + '"']


def _program_strategy() -> st.SearchStrategy[str]:
    grammar = resources.files("fusionlang.grammar").joinpath("fuse.lark").read_text()
    lark = Lark(grammar, parser="lalr", start="start")
    explicit = {
        "NAME": st.sampled_from(NAMES).map(lambda s: f" {s} "),
        "NUMBER": st.sampled_from(NUMBERS).map(lambda s: f" {s} "),
        "STRING": st.sampled_from(STRINGS).map(lambda s: f" {s} "),
        "COMMENT": st.sampled_from(["# c", "# note", "#"]).map(lambda s: f" {s}\n"),
        "TYPE_NAME": st.sampled_from(["model", "models", "number", "numbers", "int", "string", "any"]).map(
            lambda s: f" {s} "),
    }
    # every other terminal (keywords, punctuation) with spaces around it, so tokens never merge
    for t in lark.terminals:
        if t.name not in explicit and t.pattern.type == "str":
            explicit[t.name] = st.just(f" {t.pattern.value} ")
    return from_lark(lark, explicit=explicit)


PROGRAMS = _program_strategy()


def _seeds() -> list[bytes]:
    files = sorted((REPO / "specs").glob("*.fuse")) + sorted((REPO / "stdlib").glob("*.fuse"))
    return [f.read_bytes() for f in files]


SEEDS = _seeds()


@st.composite
def mutated(draw) -> bytes:
    """A shipped spec with a few bytes deleted, inserted or duplicated."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["delete", "insert", "duplicate"]))
        n = draw(st.integers(1, 12))
        if kind == "delete":
            del data[i:i + n]
        elif kind == "insert":
            data[i:i] = draw(st.one_of(
                st.binary(min_size=1, max_size=n),
                st.sampled_from([b"(", b")", b"[", b"]", b"{", b"}", b'"', b"\\", b"==", b"-", b"/", b"#", b"\n",
                                 b"1e999", b"\\N{x}", b"\xff", b"\xc3", b"\x00", b"if", b"merge ", b"\r"])))
        else:
            data[i:i] = data[i:i + n]
    return bytes(data)


# ---------------------------------------------------------------------- the contract
_DIR = Path(tempfile.mkdtemp(prefix="fusionlang-fuzz-"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)


def _ir(path: Path):
    """The checked program without spans (and without its own text), or None on errors."""
    try:
        prog = check_file(str(path))
    except FuseErrors:
        return None

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not k.endswith("span")}
        if isinstance(x, (list, tuple)):
            return [strip(v) for v in x]
        return x

    return strip({"bindings": {k: v.model_dump() for k, v in prog.bindings.items()},
                  "defs": {k: v.model_dump() for k, v in prog.defs.items()},
                  "saves": [s.model_dump() for s in prog.saves]})


def assert_contract(data: bytes) -> None:
    path = _DIR / "spec.fuse"
    path.write_bytes(data)
    rc, out, err = run_cli("check", "--format", "json", str(path), cwd=_DIR)
    assert rc in (0, 1) and "Traceback" not in out + err, f"check exit {rc}\n{err[-3000:]}\n--- input:\n{data[:2000]!r}"
    text = data.decode("utf-8", "replace")
    lines = text.split("\n")
    for d in json.loads(out)[0]["diagnostics"]:
        assert d["line"] >= 1 and d["col"] >= 1, d
        if d["severity"] == "error":
            assert d["hint"].strip(), d
        if Path(d["file"]).resolve() == path.resolve() and d["code"] != "E008":
            assert d["line"] <= len(lines), (d, data[:2000])
            assert d["col"] <= len(lines[d["line"] - 1]) + 2, (d, data[:2000])
    checked_ok = rc == 0

    rc, formatted, err = run_cli("fmt", str(path), cwd=_DIR)
    assert rc in (0, 1) and "Traceback" not in err, f"fmt exit {rc}\n{err[-3000:]}\n--- input:\n{data[:2000]!r}"
    if rc != 0:
        assert "error[" in err, err
        return
    parse(formatted, "formatted.fuse")  # fmt output always parses
    path.write_text(formatted)
    rc2, again, _err2 = run_cli("fmt", str(path), cwd=_DIR)
    assert rc2 == 0 and again == formatted, f"fmt is not idempotent\n--- input:\n{data[:2000]!r}\n--- once:\n{formatted}"
    if checked_ok:
        path.write_bytes(data)
        before = _ir(path)
        path.write_text(formatted)
        assert _ir(path) == before, f"fmt changed the meaning\n--- input:\n{data[:2000]!r}\n--- fmt:\n{formatted}"


# ---------------------------------------------------------------------- tests
@FUZZ
@given(PROGRAMS)
def test_fuzz_grammar_programs(text):
    assert_contract(text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(mutated())
def test_fuzz_mutated_specs(data):
    assert_contract(data)


@pytest.mark.parametrize("i", range(len(SEEDS)))
def test_shipped_specs_are_fmt_fixed_points(i):
    """The seeds themselves: no errors from the parser, and fmt keeps their meaning."""
    assert_contract(SEEDS[i])
