"""Saved plans (`fusionlang run PLAN.json`) that were edited or damaged: a located E008
naming the plan and the problem, exit 1, nothing written; an intact plan runs to the
same tensors as its spec."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_state, run_cli, write_spec

SPEC = '''use merging
model base = local("{base}")
models experts = [local("{e0}"), local("{e1}")]
merge m = ties(base, experts, density=0.5)
merge d = dare(base, experts, density=0.7, seed=3)
save m to "{out}/m"
save d to "{out}/d"
'''


@pytest.fixture
def plan_file(tmp_path, llama):
    spec = write_spec(tmp_path, SPEC.format(**{k: str(v) for k, v in llama.items()}, out=tmp_path / "out"))
    plan = tmp_path / "plan.json"
    rc, out, err = run_cli("compile", str(spec), "--emit", "json", "-o", str(plan), "-q")
    assert rc == 0, out + err
    return spec, plan


def _first(data, op):
    return next(n for n in data["nodes"] if n["op"] == op)


def _edit_unknown_op(d):
    _first(d, "disjoint_merge")["op"] = "frobnicate"


def _edit_dangling_input(d):
    _first(d, "disjoint_merge")["inputs"][0] = "no-such-node"


def _edit_wrong_type(d):
    _first(d, "drop_rows")["params"] = [[k, "half" if k == "density" else v] for k, v in _first(d, "drop_rows")["params"]]


def _edit_nan_param(d):
    n = _first(d, "drop_rows")
    n["params"] = [[k, float("nan") if k == "density" else v] for k, v in n["params"]]


def _edit_unknown_param(d):
    _first(d, "disjoint_merge")["params"].append(["temperature", 2.0])


def _edit_bad_choice(d):
    n = _first(d, "disjoint_merge")
    n["params"] = [[k, "median" if k == "merge" else v] for k, v in n["params"]]


def _edit_order(d):
    d["nodes"].reverse()


def _edit_load_unknown_tensor(d):
    n = _first(d, "load")
    n["params"] = [[k, "no.such.tensor" if k == "tensor" else v] for k, v in n["params"]]


def _edit_output_dtype(d):
    d["outputs"][0]["dtype"] = "int3"


def _edit_output_node(d):
    t = next(iter(d["outputs"][0]["tensors"]))
    d["outputs"][0]["tensors"][t] = "gone"


def _edit_params_not_list(d):
    _first(d, "disjoint_merge")["params"] = {"merge": "mean"}


def _edit_sources_list(d):
    d["sources"] = [1, 2]


def _edit_input_count(d):
    _first(d, "sub")["inputs"].pop()


EDITS = {name[len("_edit_"):]: fn for name, fn in globals().items() if name.startswith("_edit_")}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_damaged_plan_is_a_located_error(tmp_path, plan_file, edit):
    _, plan = plan_file
    data = json.loads(plan.read_text())
    EDITS[edit](data)
    plan.write_text(json.dumps(data))
    rc, out, err = run_cli("run", str(plan), "-q")
    text = out + err
    assert rc == 1, text
    assert f"{plan}:1:1: error[E008]: cannot load plan" in text, text
    assert "Traceback" not in text and "internal error" not in text
    assert "hint:" in text
    assert not (tmp_path / "out").exists()


def test_deeply_nested_plan_json(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text("[" * 100000 + "]" * 100000)
    rc, out, err = run_cli("run", str(plan), "-q")
    assert rc == 1 and "error[E008]" in out + err


def test_intact_plan_runs_like_its_spec(tmp_path, plan_file):
    spec, plan = plan_file
    rc, out, err = run_cli("run", str(plan), "-q")
    assert rc == 0, out + err
    from_plan = {n: load_state(tmp_path / "out" / n) for n in ("m", "d")}
    rc, out, err = run_cli("run", str(spec), "-q")
    assert rc == 0, out + err
    for n in ("m", "d"):
        again = load_state(tmp_path / "out" / n)
        assert from_plan[n].keys() == again.keys()
        for k in again:
            assert torch.equal(from_plan[n][k], again[k]), (n, k)
