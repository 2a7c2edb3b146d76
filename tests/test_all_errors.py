"""'All errors of a file': an error in one merge does not hide another merge's unmatched
rule patterns, and run/compile name every absent model, not only the first."""

from __future__ import annotations

import re

import pytest
from conftest import run_cli, write_spec

SPEC = '''use merging
model base = local("{base}")
model e1 = local("{e0}")
model e2 = local("{e1}")
merge a = ties(base, [e1, e2], density=1.5)
merge b = linear([e1, e2], weights=[1.0, 1.0]) {{
    "nomatch.*" => base
}}
merge c = task_arithmetic(base, [e1, e2], scale=0.3) {{
    "layers.{{i}}.zzz" => base
}}
save a to "{out}/a"
save b to "{out}/b"
save c to "{out}/c"
'''


def _errors(text: str) -> list[tuple[int, int, str]]:
    return [(int(m[1]), int(m[2]), m[3]) for m in re.finditer(r"spec\.fuse:(\d+):(\d+): error\[(E\d+)\]", text)]


@pytest.mark.parametrize("cmd", ["check", "compile", "run"])
def test_bad_argument_does_not_hide_unmatched_patterns(tmp_path, llama, cmd):
    spec = write_spec(tmp_path, SPEC.format(**{k: str(v) for k, v in llama.items()}, out=tmp_path / "out"))
    rc, out, err = run_cli(cmd, str(spec), *([] if cmd == "check" else ["-q"]))
    assert rc == 1
    assert _errors(out + err) == [(5, 40, "E006"), (7, 5, "E012"), (10, 5, "E012")], out + err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cmd", ["compile", "run"])
def test_every_absent_model_is_named(tmp_path, monkeypatch, cmd):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    spec = write_spec(tmp_path, 'use merging\nmodel a = hf("nobody/missing-one")\nmodel b = hf("nobody/missing-two")\n'
                                f'model c = local("{tmp_path / "nowhere"}")\n'
                                f'merge m = average([a, b, c])\nsave m to "{tmp_path / "out"}"\n')
    rc, out, err = run_cli(cmd, str(spec), "-q")
    assert rc == 1
    assert _errors(out + err) == [(2, 11, "E017"), (3, 11, "E017"), (4, 11, "E010")], out + err
