"""fmt: canonical, idempotent, meaning-preserving, comment-keeping."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import REPO

from fusionlang.lang.diagnostics import Span
from fusionlang.lang.fmt import format_source
from fusionlang.lang.parser import parse

MESSY = '''# header comment
use   merging
model base=local( "zoo/base" )   # the base
models experts=[local("a"),local("b"),
   local("c")]
let k=0.3
def f(base:model,xs:models,k:number=0.3)->model=base+k*sum([e-base for e in xs])
merge m = f(base , experts , k = k) {
  # a rule comment
  "*norm.weight"=>base
  "layers.{i}.mlp.*" => (base + base) * 0.5 - -base   # trailing
}
merge n = if k == 0.3 then base else experts[0]
save m to "out/m" as bf16
'''


def strip_spans(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, Span):
        return tuple((f.name, strip_spans(getattr(x, f.name))) for f in dataclasses.fields(x)
                     if f.name not in ("span", "var_span", "func_span", "pattern_span", "name_span", "path_span",
                                       "dtype_span", "file", "text"))
    if isinstance(x, tuple):
        return tuple(strip_spans(i) for i in x)
    return x


def test_fmt_is_idempotent_and_preserves_meaning():
    once = format_source(MESSY, "messy.fuse")
    assert format_source(once, "messy.fuse") == once
    assert strip_spans(parse(once, "a.fuse")) == strip_spans(parse(MESSY, "b.fuse"))
    for comment in ("# header comment", "# the base", "# a rule comment", "# trailing"):
        assert comment in once
    assert 'model base = local("zoo/base")  # the base' in once
    assert '    "*norm.weight" => base' in once
    assert "(base + base) * 0.5 - -base" in once


FILES = sorted((REPO / "specs").glob("*.fuse")) + sorted((REPO / "stdlib").glob("*.fuse")) \
    + [p for p in sorted((REPO / "tests/golden").rglob("*.fuse")) if not p.stem.startswith("syntax_")]  # those do not parse


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_fmt_idempotent_on_repo_files(path: Path):
    text = path.read_text()
    once = format_source(text, str(path))
    assert format_source(once, str(path)) == once
    assert strip_spans(parse(once, "x")) == strip_spans(parse(text, "x"))
