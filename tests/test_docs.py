"""Every ```fuse example in docs/ and README.md checks cleanly and is canonically formatted."""

from __future__ import annotations

import re

import pytest
from conftest import REPO, run_cli

DOCS = [REPO / "docs/language.md", REPO / "README.md"]
BLOCKS = [(p, i, m.group(1)) for p in DOCS for i, m in enumerate(re.finditer(r"```fuse\n(.*?)```", p.read_text(), re.DOTALL))]


@pytest.mark.parametrize("path,i,text", BLOCKS, ids=[f"{p.name}#{i}" for p, i, _ in BLOCKS])
def test_doc_example_checks(tmp_path, path, i, text):
    spec = tmp_path / "example.fuse"
    spec.write_text(text)
    rc, _out, err = run_cli("check", str(spec))
    assert rc == 0, err
    if path.name == "language.md":
        rc, _, err = run_cli("fmt", "--check", str(spec))
        assert rc == 0, f"example {i} of {path.name} is not in canonical form"


def test_specs_and_stdlib_are_canonical_and_check():
    files = sorted((REPO / "specs").glob("*.fuse")) + sorted((REPO / "stdlib").glob("*.fuse"))
    assert files
    rc, _, err = run_cli("fmt", "--check", *map(str, files))
    assert rc == 0, err
    rc, _, err = run_cli("check", *map(str, sorted((REPO / "specs").glob("*.fuse"))))
    assert rc == 0, err
