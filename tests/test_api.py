"""The Python API (fusionlang.check / compile / run / load) and docs/api.md's examples."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, load_state, make_family, run_cli, write_spec

import fusionlang
from fusionlang.lang.diagnostics import render_all


def _task_arithmetic(base: dict, experts: list[dict], scale: float) -> dict:
    return {k: base[k].float() + scale * sum(e[k].float() - base[k].float() for e in experts) for k in base}


@pytest.fixture()
def family(tmp_path):
    """models/base, models/math, models/code (a tiny Llama family) under tmp_path."""
    fam = make_family(tmp_path / "models", "llama", n_experts=2)
    os.rename(fam["e0"], tmp_path / "models/math")
    os.rename(fam["e1"], tmp_path / "models/code")
    return tmp_path


SPEC = '''use merging
model base = local("models/base")
models experts = [local("models/math"), local("models/code")]
merge ta = task_arithmetic(base, experts, scale=0.5)
save ta to "out/ta"
'''


def test_import_is_light_and_check_needs_no_torch(tmp_path):
    spec = write_spec(tmp_path, SPEC)  # models absent: check verifies what it can
    code = ("import sys, fusionlang\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
            f"r = fusionlang.check({str(spec)!r})\n"
            "assert r.ok and len(r.unverified) == 3, r.unverified\n"
            "assert 'torch' not in sys.modules, 'check imported torch'\n"
            "print(type(fusionlang.FuseErrors).__name__, fusionlang.FuseErrors.__module__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["type", "fusionlang.lang.diagnostics"]
    with pytest.raises(AttributeError):
        fusionlang.no_such_thing  # noqa: B018


def test_run_writes_the_merge_and_load_reads_it_back(family, monkeypatch):
    monkeypatch.chdir(family)
    write_spec(family, SPEC)
    res = fusionlang.run("spec.fuse", device="cpu", progress=False)
    out = family / "out/ta"
    assert res.outputs == {"ta": str(out)} and res.reports == [] and res.tuning == []
    assert res.bytes_written > 0 and res.bytes_read > res.bytes_written  # three inputs, one output
    want = _task_arithmetic(load_state(family / "models/base"),
                            [load_state(family / "models/math"), load_state(family / "models/code")], 0.5)
    got = load_state(out)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k], rtol=0, atol=1e-6)
    assert res.warnings == []
    model = fusionlang.load(out)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v.float(), want[k], rtol=0, atol=1e-6)


def test_compile_returns_the_plan_and_writes_nothing(family, monkeypatch):
    monkeypatch.chdir(family)
    spec = write_spec(family, SPEC)
    plan = fusionlang.compile(spec)
    assert list(plan.outputs) == ["ta"] and plan.outputs["ta"].path == str(family / "out/ta")
    assert plan.history[0][0] == "lower"
    assert len(plan.outputs["ta"].tensors) == len(load_state(family / "models/base"))
    from fusionlang.plan import emit

    for passes, arg in ((None, []), ("fold", ["--passes", "fold"]), (["fold", "dce"], ["--passes", "fold,dce"])):
        p = fusionlang.compile(spec, passes=passes)
        rc, out, err = run_cli("compile", str(spec), *arg, "--emit", "json", "-q")
        assert rc == 0, err
        assert emit.to_json(p) == out  # the command line's plan, exactly
    assert [n for n, _ in p.history][:3] == ["lower", "fold", "dce"] and "cse" not in dict(p.history)
    assert not (family / "out").exists()
    with pytest.raises(fusionlang.FuseErrors) as e:
        fusionlang.compile(spec, passes=["fold", "nope"])
    [d] = e.value.diagnostics
    assert (d.code, str(d.span), d.message) == ("E004", "<python>:1:1", "unknown pass 'nope'") and d.hint


def test_errors_carry_the_cli_diagnostics(family, monkeypatch):
    monkeypatch.chdir(family)
    spec = write_spec(family, SPEC.replace("scale=0.5", "scal=0.5").replace("(base, experts,", "(base, expert,"), "bad.fuse")
    for fn in (fusionlang.check, fusionlang.compile, fusionlang.run):
        with pytest.raises(fusionlang.FuseErrors) as e:
            fn(spec)
        diags = e.value.diagnostics
        assert {d.code for d in diags} == {"E002", "E004"} and all(d.hint for d in diags)
        rc, _, err = run_cli("check", str(spec))
        assert rc == 1 and render_all(sorted(diags, key=lambda d: (d.span.line, d.span.col)), False) in err
    assert not (family / "out").exists()
    with pytest.raises(fusionlang.FuseErrors) as e:
        fusionlang.run(write_spec(family, SPEC), device="tpu")
    assert e.value.diagnostics[0].code == "E006" and "auto, cpu, cuda, mps" in e.value.diagnostics[0].hint
    with pytest.raises(fusionlang.FuseErrors) as e:
        fusionlang.load(family / "models")
    assert e.value.diagnostics[0].code == "E010"
    (family / "models/math/config.json").write_text("[1, 2]")
    with pytest.raises(fusionlang.FuseErrors) as e:
        fusionlang.load(family / "models/math")
    assert e.value.diagnostics[0].code == "E011" and "not a JSON object" in e.value.diagnostics[0].message


def test_run_errors_at_run_time_are_located_fuse_errors(family, monkeypatch):
    monkeypatch.chdir(family)
    (family / "blocker").write_text("a file where the output's parent directory should be")
    spec = write_spec(family, SPEC.replace('"out/ta"', '"blocker/ta"'))
    with pytest.raises(fusionlang.FuseErrors) as e:
        fusionlang.run(spec, device="cpu", progress=False)
    [d] = e.value.diagnostics
    rc, _, err = run_cli("run", str(spec), "--device", "cpu")
    assert rc == 1 and f"{d.span}: error[{d.code}]: {d.message}" in err and d.hint
    assert (family / "blocker").is_file()


def test_run_returns_the_spec_warnings(family, monkeypatch, capfd):
    monkeypatch.chdir(family)
    spec = write_spec(family, SPEC.replace("merge ta", "merge mul").replace("save ta", "save mul"))
    res = fusionlang.run(spec, device="cpu")
    [w] = res.warnings
    assert (w.code, w.severity, str(w.span)) == ("W001", "warning", f"{spec}:4:1") and w.hint
    assert f"{spec}:4:1: warning[W001]: 'mul' shadows a built-in" in capfd.readouterr().err
    assert res.outputs == {"mul": str(family / "out/ta")}


def test_load_picks_the_auto_class_from_the_config(tmp_path):
    from fusionlang.api import auto_class_name

    for arch, cls in (("gpt2", "GPT2LMHeadModel"), ("bert", "BertModel")):
        fam = make_family(tmp_path / arch, arch, n_experts=0)
        model = fusionlang.load(fam["base"])
        assert type(model).__name__ == cls
        want = load_state(fam["base"])
        sd = model.state_dict()
        for k, v in want.items():
            assert torch.equal(sd[k], v), k
    assert auto_class_name({"architectures": ["ViTForImageClassification"]}) == "AutoModelForImageClassification"
    assert auto_class_name({"architectures": ["BertModel"]}) == "AutoModel"
    assert auto_class_name({}) == "AutoModel"


def test_docs_api_examples_run(family, monkeypatch):
    """Every ```python block of docs/api.md, in order, on its ```fuse spec."""
    text = (REPO / "docs/api.md").read_text()
    [spec] = re.findall(r"```fuse\n(.*?)```", text, re.DOTALL)
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) >= 4
    monkeypatch.chdir(family)
    (family / "merge.fuse").write_text(spec)
    ns: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, "docs/api.md", "exec"), ns)  # noqa: S102
    printed = out.getvalue()
    # the comments of the blocks say what they print
    assert "['ta']" in printed and "LlamaForCausalLM" in printed
    shown = re.findall(r"^\s*# (broken\.fuse:\S+ E\d+: .*)$", text, re.MULTILINE)  # the documented diagnostic
    assert shown and all(line in printed.splitlines() for line in shown), printed
    want = _task_arithmetic(load_state(family / "models/base"),
                            [load_state(family / "models/math"), load_state(family / "models/code")], 0.5)
    got = load_state(family / "out/ta")
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k], rtol=0, atol=1e-6)
    assert [n for n, _ in ns["fewer"].history][:3] == ["lower", "fold", "dce"]
    assert "cse" not in dict(ns["fewer"].history)
