"""Outputs: where they may go (the save-path rules, E016), how they are committed (all
outputs or none, leftovers of killed runs), and the values they may hold (E030 overflow
of `save ... as fp16`, E031 non-finite inputs). Real tiny models, the real CLI; expected
values come from plain torch on the safetensors files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_state, make_family, run_cli
from safetensors.torch import load_file, save_file

_HEAD = re.compile(r"^(?P<file>[^\n]+?):(?P<line>\d+):(?P<col>\d+): error\[(?P<code>\w+)\]: (?P<msg>.*)$")


def errors(err: str) -> list[dict]:
    """The errors rendered in `err`, each with its hint."""
    out, cur = [], None
    for line in err.splitlines():
        m = _HEAD.match(line)
        if m:
            cur = {**m.groupdict(), "line": int(m["line"]), "col": int(m["col"]), "hint": ""}
            out.append(cur)
        elif cur is not None and line.startswith("  = hint: "):
            cur["hint"] = line[len("  = hint: "):]
    return out


def where(text: str, needle: str) -> tuple[int, int]:
    """1-based (line, column) of the last `needle` in a spec text."""
    pos = text.rindex(needle)
    return text.count("\n", 0, pos) + 1, pos - (text.rfind("\n", 0, pos) + 1) + 1


def expect(res, code: str, spec: Path, needle: str, *words: str) -> dict:
    """Exit 1, no traceback, and exactly one error `code` located at `needle` in `spec`,
    with a hint, whose message has every one of `words`."""
    rc, out, err = res
    assert "Traceback" not in out + err, err
    assert rc == 1, err
    errs = errors(err)
    assert len(errs) == 1, err
    e = errs[0]
    line, col = where(spec.read_text(), needle)
    assert (e["code"], Path(e["file"]).name, e["line"], e["col"]) == (code, spec.name, line, col), err
    assert e["hint"], err
    for w in words:
        assert w in e["msg"], err
    return e


def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 (or '->target' for a link) of everything under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "->" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".fusionlang-" in p.name)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("fam"), "llama", n_experts=2)


@pytest.fixture
def work(tmp_path, family) -> Path:
    """tmp_path with a private copy of the models in tmp_path/models and a notes file."""
    for k, p in family.items():
        shutil.copytree(p, tmp_path / "models" / k)
    (tmp_path / "models" / "notes.txt").write_text("mine\n")
    return tmp_path


AVG = 'use merging\n\nmodel a = local("models/e0")\nmodel b = local("models/e1")\n\nmerge soup = average([a, b])\n\n'


def spec(root: Path, text: str, name: str = "spec.fuse") -> Path:
    p = root / name
    p.write_text(text)
    return p


def average_of(*dirs: Path) -> dict[str, torch.Tensor]:
    states = [load_state(d) for d in dirs]
    return {k: sum(s[k].float() for s in states) / len(states) for k in states[0]}


# ---------------------------------------------------------------------- where outputs may go
@pytest.mark.parametrize("target, words", [
    ("models", ["contains the input model"]),          # holds both inputs and notes.txt
    (".", ["contains the input model"]),               # the spec's own directory
    ("models/e0", ["is the directory of the input model 'a'"]),
    ("models/e0/sub", ["inside the directory of the input model 'a'"]),
])
@pytest.mark.parametrize("cmd", ["check", "compile", "run"])
def test_output_over_inputs_refused(work, target, words, cmd):
    p = spec(work, AVG + f'save soup to "{target}"\n')
    before = tree(work)
    expect(run_cli(cmd, str(p), *(["-q"] if cmd != "check" else [])), "E016", p, f'"{target}"', *words)
    assert tree(work) == before


def test_output_through_symlink_to_input_refused(work):
    os.symlink(work / "models" / "e1", work / "alias")
    p = spec(work, AVG + 'save soup to "alias"\n')
    before = tree(work)
    e = expect(run_cli("run", str(p), "-q"), "E016", p, '"alias"', "input model 'b'")
    assert "choose an output directory that contains no input model or spec" in e["hint"]
    assert tree(work) == before


def test_output_holding_an_imported_spec_refused(work):
    (work / "lib").mkdir()
    (work / "lib" / "defs.fuse").write_text("use merging\n\ndef half(x: model, y: model) -> model = average([x, y])\n")
    p = spec(work, 'use "lib/defs.fuse"\n\nmodel a = local("models/e0")\nmodel b = local("models/e1")\n\n'
                   'merge soup = half(a, b)\n\nsave soup to "lib"\n')
    before = tree(work)
    expect(run_cli("check", str(p)), "E016", p, '"lib"', "contains the spec", "defs.fuse")
    assert tree(work) == before


def test_foreign_directory_refused_earlier_output_replaced(work):
    (work / "mine").mkdir()
    (work / "mine" / "thesis.tex").write_text("years of work\n")
    p = spec(work, AVG + 'save soup to "mine"\n')
    before = tree(work)
    expect(run_cli("run", str(p), "-q"), "E016", p, '"mine"', "did not write", "thesis.tex")
    assert tree(work) == before

    # an empty directory, and then an earlier output of fusionlang (with a file added), are
    # replaced: re-running a spec replaces its previous output whole (regression case 02)
    p = spec(work, AVG + 'save soup to "out/soup"\n')
    (work / "out" / "soup").mkdir(parents=True)
    assert run_cli("run", str(p), "-q")[0] == 0
    (work / "out" / "soup" / "old.txt").write_text("from the previous run\n")
    rc, _, err = run_cli("run", str(p), "-q")
    assert rc == 0, err
    assert not (work / "out" / "soup" / "old.txt").exists()
    got = load_state(work / "out" / "soup")
    want = average_of(work / "models" / "e0", work / "models" / "e1")
    for k, v in want.items():
        torch.testing.assert_close(got[k].float(), v)
    assert leftovers(work) == []


def test_nested_saves_refused(work):
    p = spec(work, AVG + 'merge other = average([b, a])\n\nsave soup to "out/x"\nsave other to "out/x/y"\n')
    expect(run_cli("check", str(p)), "E016", p, '"out/x/y"', "inside the output of the save at", "spec.fuse:10:14")
    p = spec(work, AVG + 'save soup to "out/x/y"\nsave a to "out/x"\n')
    expect(run_cli("run", str(p), "-q"), "E016", p, '"out/x"\n', "holds the output of the save")
    assert not (work / "out").exists()


def test_check_without_models_still_checks_save_paths(work):
    p = spec(work, AVG.replace("models/e1", "models/absent") + 'save soup to "models"\n')
    rc, out, err = run_cli("check", str(p))
    assert rc == 1 and "Traceback" not in out + err, err
    line, col = where(p.read_text(), '"models"')
    assert f"spec.fuse:{line}:{col}: error[E016]: output" in err and "contains the input model 'a'" in err, err


def test_dangling_symlink_output_refused_before_any_work(work):
    (work / "out").mkdir()
    os.symlink("missing-volume", work / "out" / "two")
    p = spec(work, AVG + 'save soup to "out/two"\n')
    before = tree(work)
    for cmd in ("check", "run"):
        expect(run_cli(cmd, str(p)), "E016", p, '"out/two"', "symbolic link", "missing-volume")
    assert tree(work) == before


def test_symlinked_output_replaces_its_target_and_keeps_the_link(work):
    p = spec(work, AVG + 'save soup to "real/soup"\n')
    assert run_cli("run", str(p), "-q")[0] == 0  # an earlier output, which the link will point at
    os.symlink("real/soup", work / "link")
    p = spec(work, AVG.replace("[a, b]", "[a, a, b]") + 'save soup to "link"\n')
    rc, _, err = run_cli("run", str(p), "-q")
    assert rc == 0, err
    assert (work / "link").is_symlink() and os.readlink(work / "link") == "real/soup"
    e0, e1 = load_state(work / "models" / "e0"), load_state(work / "models" / "e1")
    got = load_state(work / "real" / "soup")
    for k in e0:
        torch.testing.assert_close(got[k].float(), (2 * e0[k].float() + e1[k].float()) / 3)
    assert leftovers(work) == []


def test_saved_plan_checks_paths_at_run(work):
    p = spec(work, AVG + 'save soup to "out/soup"\n')
    plan = work / "plan.json"
    assert run_cli("compile", str(p), "--emit", "json", "-o", str(plan), "-q")[0] == 0
    (work / "out" / "soup").mkdir(parents=True)
    (work / "out" / "soup" / "keep.txt").write_text("x\n")
    before = tree(work)
    expect(run_cli("run", str(plan), "-q"), "E016", p, '"out/soup"', "did not write", "keep.txt")
    assert tree(work) == before


def test_saved_plan_protects_the_specs_it_uses(work):
    """A spec file that the spec `use`s stays protected when a saved plan runs (the plan
    records the spec files), even if the plan's output was edited to point at its folder."""
    p = spec(work, AVG + 'save soup to "out/soup"\n')
    assert run_cli("run", str(p), "-q")[0] == 0  # out/soup: an earlier fusionlang output
    (work / "out" / "soup" / "defs.fuse").write_text("use merging\n\ndef half(x: model, y: model) -> model = average([x, y])\n")
    q = spec(work, 'use "out/soup/defs.fuse"\n\nmodel a = local("models/e0")\nmodel b = local("models/e1")\n\n'
                   'merge soup = half(a, b)\n\nsave soup to "out/other"\n', "q.fuse")
    plan = work / "plan.json"
    assert run_cli("compile", str(q), "--emit", "json", "-o", str(plan), "-q")[0] == 0
    data = json.loads(plan.read_text())
    data["outputs"][0]["path"] = str(work / "out" / "soup")
    plan.write_text(json.dumps(data))
    before = tree(work / "out")
    rc, _, err = run_cli("run", str(plan), "-q")
    assert rc == 1 and "error[E016]" in err and "defs.fuse" in err, err
    assert tree(work / "out") == before


def test_compile_writes_nothing(work):
    p = spec(work, AVG + 'save soup to "out/deep/soup"\n')
    before = tree(work)
    rc, _, err = run_cli("compile", str(p), "-q")
    assert rc == 0, err
    assert tree(work) == before


# ---------------------------------------------------------------------- values
TA_TWICE = ('use merging\n\nmodel base = local("models/base")\nmodel e = local("models/e0")\n\n'
            'merge ta = task_arithmetic(base, [e], scale=0.5)\n\nsave ta to "out/a" as bf16\nsave ta to "out/b" as fp16\n')


def test_one_merge_saved_twice_writes_both(work):
    p = spec(work, TA_TWICE)
    rc, _, err = run_cli("run", str(p), "-q")
    assert rc == 0, err
    base, e = load_state(work / "models" / "base"), load_state(work / "models" / "e0")
    for out, dtype in (("a", torch.bfloat16), ("b", torch.float16)):
        got = load_file(work / "out" / out / "model.safetensors")
        assert set(got) == set(base)
        for k in base:
            want = (base[k].float() + 0.5 * (e[k].float() - base[k].float())).to(dtype)
            assert got[k].dtype == dtype
            torch.testing.assert_close(got[k], want)
        config = json.loads((work / "out" / out / "config.json").read_text())
        assert config.get("torch_dtype", config.get("dtype")) == str(dtype)[6:]


def _with(src: Path, dst: Path, tensor: str, fill: float, where_: tuple | None = None) -> None:
    """A copy of model `src` at `dst` with `tensor` set to `fill` (everywhere, or at one index)."""
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    if where_ is None:
        sd[tensor].fill_(fill)
    else:
        sd[tensor][where_] = fill
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})


def test_fp16_overflow_is_a_located_error(work):
    _with(work / "models" / "base", work / "models" / "big", "model.norm.weight", 1.4e5)
    p = spec(work, 'use merging\n\nmodel base = local("models/base")\nmodel big = local("models/big")\n\n'
                   'merge avg = average([base, big])\n\nsave avg to "out/avg" as fp16\n')
    e = expect(run_cli("run", str(p), "-q"), "E030", p, '"out/avg"', "model.norm.weight", "F16", "65504")
    top = float(re.search(r"max \|value\| ([0-9.e+]+)", e["msg"])[1])
    want = float((load_state(work / "models" / "base")["model.norm.weight"] + 1.4e5).abs().max() / 2)
    assert abs(top - want) <= 1e-3 * want
    assert not (work / "out").exists()
    # bf16 holds it: the same merge saved as bf16 runs
    p.write_text(p.read_text().replace("as fp16", "as bf16"))
    assert run_cli("run", str(p), "-q")[0] == 0
    got = load_file(work / "out" / "avg" / "model.safetensors")["model.norm.weight"]
    assert torch.isfinite(got).all() and float(got.float().min()) > 6e4


@pytest.mark.parametrize("merge", ["average([a, b])", "ties(base, [a, b], density=0.5)",
                                   'ties(base, [a, b], density=0.5, scope="model")', "dare(base, [a, b], density=0.5)"])
def test_nonfinite_input_is_located_at_its_model(work, merge):
    _with(work / "models" / "e1", work / "models" / "bad", "model.layers.1.mlp.up_proj.weight", float("nan"), (0, 3))
    p = spec(work, 'use merging\n\nmodel base = local("models/base")\nmodel a = local("models/e0")\n'
                   f'model b = local("models/bad")\n\nmerge m = {merge}\n\nsave m to "out/m"\n')
    expect(run_cli("run", str(p), "-q"), "E031", p, 'local("models/bad")', "'b'", "model.layers.1.mlp.up_proj.weight",
           "1 non-finite value")
    assert not (work / "out").exists()


@pytest.mark.parametrize("size", ["nan", "inf", "-1", "0", "1e-12"])
def test_bad_shard_size(work, size):
    p = spec(work, AVG + 'save soup to "out/soup"\n')
    rc, out, err = run_cli("run", str(p), "-q", "--shard-size", size)
    assert rc == 1 and "Traceback" not in out + err, err
    assert "error[E006]" in err and "--shard-size" in err and "hint:" in err, err
    assert not (work / "out").exists()


# ---------------------------------------------------------------------- commit: all or none
TWO = ('use merging\n\nmodel base = local("models/base")\nmodels experts = [local("models/e0"), local("models/e1")]\n\n'
       'merge ta = task_arithmetic(base, experts, scale=0.5)\nmerge soup = average(experts)\n\n'
       'save ta to "out/one"\nsave soup to "out/two"\n')


@pytest.mark.parametrize("failing", [".two.fusionlang-tmp-", ".two.fusionlang-old-"])
def test_failed_commit_moves_everything_back(work, monkeypatch, failing):
    p = spec(work, TWO)
    assert run_cli("run", str(p), "-q")[0] == 0
    with open(work / "out" / "one" / "README.md", "a") as f:  # marks the earlier output's bytes
        f.write("an earlier run\n")
    before = tree(work / "out")
    real_rename = os.rename

    def rename(src, dst, *a, **k):  # the second output cannot be moved in (or its old one aside)
        if failing in str(src) + str(dst):
            raise OSError(16, "Device or resource busy", str(src))
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", rename)
    expect(run_cli("run", str(p), "-q"), "E016", p, '"out/two"', "'soup'", "no output was changed")
    monkeypatch.undo()
    assert tree(work / "out") == before
    assert leftovers(work) == []


def test_leftovers_of_dead_runs_removed_live_kept_old_restored(work, family):
    p = spec(work, AVG + 'save soup to "out/soup"\n')
    assert run_cli("run", str(p), "-q")[0] == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = work / "out"
        # a run killed between its two renames: the previous output is only in -old-
        os.rename(out / "soup", out / f".soup.fusionlang-old-{dead.pid}")
        (out / f".soup.fusionlang-tmp-{dead.pid}").mkdir()
        (out / f".soup.fusionlang-tmp-{dead.pid}" / "model.safetensors").write_bytes(b"\0" * 64)
        (out / f".soup.fusionlang-tmp-{live.pid}").mkdir()
        (out / f".other.fusionlang-tmp-{dead.pid}").mkdir()  # another output's: not ours to judge
        restored_from = tree(out / f".soup.fusionlang-old-{dead.pid}")

        # check and compile touch nothing
        before = tree(work)
        assert run_cli("check", str(p))[0] == 0 and run_cli("compile", str(p), "-q")[0] == 0
        assert tree(work) == before

        # a run that fails after its start (an fp16 overflow) has restored the previous output
        # and removed the dead run's temp dir, not the live run's nor another output's
        _with(work / "models" / "base", work / "models" / "big", "model.norm.weight", 1.4e5)
        bad = spec(work, 'use merging\n\nmodel a = local("models/base")\nmodel b = local("models/big")\n\n'
                         'merge soup = average([a, b])\n\nsave soup to "out/soup" as fp16\n', "bad.fuse")
        expect(run_cli("run", str(bad), "-q"), "E030", bad, '"out/soup"')
        assert tree(out / "soup") == restored_from
        assert sorted(x.name for x in out.iterdir()) == sorted(
            ["soup", f".soup.fusionlang-tmp-{live.pid}", f".other.fusionlang-tmp-{dead.pid}"])

        rc, _, err = run_cli("run", str(p), "-q")
        assert rc == 0, err
        assert sorted(x.name for x in out.iterdir()) == sorted(
            ["soup", f".soup.fusionlang-tmp-{live.pid}", f".other.fusionlang-tmp-{dead.pid}"])
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------- signals
SLOW_RUN = """
import sys, time
import fusionlang.runtime.sinks as ex
write = ex.ShardWriter.write
def slow(self, *a, **k):  # a slowed run: the test's models are tiny
    time.sleep(0.05)
    return write(self, *a, **k)
ex.ShardWriter.write = slow
from fusionlang.cli import main
sys.exit(main(["run", sys.argv[1], "--device", "cpu", "-q"]))
"""


def test_sigterm_cleans_up_like_sigint(work):
    p = spec(work, AVG + 'save soup to "out/soup"\n')
    assert run_cli("run", str(p), "-q")[0] == 0
    before = tree(work / "out")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, str(p)], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60

    def tmp_written() -> bool:
        return (work / "out" / f".soup.fusionlang-tmp-{proc.pid}" / "model.safetensors").exists()

    while not tmp_written() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert tmp_written(), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted: no output was left behind" in err and "Traceback" not in err, err
    assert tree(work / "out") == before
    assert leftovers(work) == []


# ---------------------------------------------------------------------- progress
def test_progress_lines_when_not_a_terminal(work):
    p = spec(work, AVG + 'save soup to "out/soup"\n')
    rc, _, err = run_cli("run", str(p))
    assert rc == 0, err
    lines = re.findall(r": (\d+)/(\d+) written \((\d+)%\)", err)
    assert lines and lines[-1][2] == "100", err
    n = len(load_state(work / "out" / "soup"))
    assert all(int(d) <= int(t) == n for d, t, _ in lines), lines


# ---------------------------------------------------------------------- what travels with an output
def test_model_card_tokenizer_and_custom_code_travel(work, monkeypatch):
    import yaml
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # the base model lives in the Hugging Face cache, with a tokenizer (chat template
    # included), custom code (auto_map) and files that must not travel
    commit = "3f2a1c0ffee0000000000000000000000000000a"
    snap = work / "hub" / "models--org--tiny-base" / "snapshots" / commit
    shutil.copytree(work / "models" / "base", snap)
    (work / "hub" / "models--org--tiny-base" / "refs").mkdir()
    (work / "hub" / "models--org--tiny-base" / "refs" / "main").write_text(commit)
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "hello", "world", "merge"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(snap)
    (snap / "tokenizer.model").write_bytes(b"sentencepiece model bytes")
    (snap / "added_tokens.json").write_text('{"<extra>": 5}\n')
    (snap / "modeling_tiny.py").write_text("# custom modeling code\n")
    config = json.loads((snap / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    (snap / "config.json").write_text(json.dumps(config))
    (snap / "training_args.bin").write_bytes(b"not a model file")
    (snap / "notes.txt").write_text("mine\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(work / "hub"))
    p = spec(work, 'use merging\n\nmodel base = hf("org/tiny-base")\nmodel e = local("models/e0")\n\n'
                   'merge m = average([base, e])\n\nsave m to "out/m"\n')
    rc, _, err = run_cli("run", str(p), "-q")
    assert rc == 0, err
    out = work / "out" / "m"
    travel = sorted(f.name for f in snap.iterdir()
                    if f.name not in ("config.json", "model.safetensors", "training_args.bin", "notes.txt"))
    assert "chat_template.jinja" in travel or "chat_template" in (snap / "tokenizer_config.json").read_text()
    for f in travel:
        assert (out / f).read_bytes() == (snap / f).read_bytes(), f
    assert not (out / "training_args.bin").exists() and not (out / "notes.txt").exists()
    assert json.loads((out / "config.json").read_text())["auto_map"] == config["auto_map"]
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded("hello merge world")["input_ids"] == fast("hello merge world")["input_ids"] == [2, 4, 3]
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta == {"base_model": ["org/tiny-base"], "library_name": "transformers", "tags": ["fusionlang", "merge"]}
    assert "example.invalid" not in card and p.read_text().strip() in card


def test_runs_with_the_same_pid_keep_apart(work):
    """Two runs whose PIDs are equal (containers sharing a volume) must not take each
    other's temporary folders for leftovers: a folder whose lock file is held is kept,
    whatever its PID; once the lock is free, the next run removes it."""
    import fcntl

    p = spec(work, AVG + 'save soup to "out/soup"\n')
    assert run_cli("run", str(p), "-q")[0] == 0
    token = str(os.getpid())  # another run with this process's PID holds the bare-PID names
    other_tmp = work / "out" / f".soup.fusionlang-tmp-{token}"
    other_tmp.mkdir()
    (other_tmp / "model.safetensors").write_bytes(b"half-written by the other run")
    lock = work / "out" / f".soup.fusionlang-lock-{token}"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert run_cli("run", str(p), "-q")[0] == 0
        assert (other_tmp / "model.safetensors").read_bytes() == b"half-written by the other run"
        assert leftovers(work) == [f"out/.soup.fusionlang-lock-{token}", f"out/.soup.fusionlang-tmp-{token}"]
    finally:
        os.close(fd)  # the other run is killed: its lock is free
    assert run_cli("run", str(p), "-q")[0] == 0
    assert leftovers(work) == []


def test_same_directory_through_a_bind_mount_is_an_input(work):
    """An output that is an input reached by another path (a bind mount, which realpath
    does not see through) is refused as that input: identity is checked by device and
    inode. Without that check the directory would only be refused as foreign."""
    import shutil as sh

    p = spec(work, AVG + 'save soup to "out/soup"\n')
    assert run_cli("run", str(p), "-q")[0] == 0
    (work / "bind").mkdir()
    mounted = subprocess.run(["mount", "--bind", str(work / "out"), str(work / "bind")], capture_output=True,
                             check=False).returncode == 0
    if not mounted:
        pytest.skip("no bind mount here (needs root and mount(8))")
    try:
        sh.copytree(work / "models" / "e0", work / "out" / "e0copy")
        q = spec(work, AVG.replace('local("models/e0")', 'local("bind/e0copy")') + 'save soup to "out/e0copy"\n', "q.fuse")
        before = tree(work / "out")
        expect(run_cli("run", str(q), "-q"), "E016", q, '"out/e0copy"', "input model")
        assert tree(work / "out") == before
    finally:
        subprocess.run(["umount", str(work / "bind")], check=False)


def test_tilde_is_the_home_directory(work, monkeypatch):
    home = work / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    p = spec(work, AVG + 'save soup to "~/merged"\n')
    rc, _, err = run_cli("run", str(p), "-q")
    assert rc == 0, err
    assert not (work / "~").exists()
    got = load_state(home / "merged")
    for k, v in average_of(work / "models" / "e0", work / "models" / "e1").items():
        torch.testing.assert_close(got[k].float(), v)


def test_unreadable_companion_file_is_located(work):
    """A file that travels with the output but cannot be copied (a dangling link inside
    the input's additional_chat_templates/, as a partial download leaves) is E016 at the
    save, nothing written; not an internal error."""
    d = work / "models" / "e0" / "additional_chat_templates"
    d.mkdir()
    os.symlink("missing.jinja", d / "tool_use.jinja")
    p = spec(work, AVG + 'save soup to "out/soup"\n')
    expect(run_cli("run", str(p), "-q"), "E016", p, '"out/soup"', "cannot finish output 'soup'")
    assert not (work / "out").exists() and leftovers(work) == []
