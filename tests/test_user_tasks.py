"""Tasks on the user's own data: accuracy() with each model's own classification head and
perplexity() of causal LMs, in `eval` next to merges, checked against independent
transformers computations; located errors for models that cannot run a task."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import (
    error_locations,
    make_causal_family,
    make_classifier_family,
    run_cli,
    write_spec,
)


@pytest.fixture(scope="module")
def cls(tmp_path_factory):
    root = tmp_path_factory.mktemp("usercls")
    return root, make_classifier_family(root, n_experts=2, rows=40, seed=5)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("userlm")
    return root, make_causal_family(root, n_experts=2, rows=30, seed=6)


def _accuracy(model_dir, rows) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    m = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    correct = 0
    with torch.no_grad():
        for r in rows:  # one row at a time: no padding at all
            logits = m(**tok([r["text"]], return_tensors="pt")).logits
            correct += int(logits.argmax(-1).item() == r["label"])
    return correct / len(rows)


def _perplexity(model_dir, texts) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok([t], return_tensors="pt")["input_ids"]
            if ids.shape[1] < 2:
                continue
            loss = m(input_ids=ids, labels=ids).loss  # mean over the row's ids.shape[1]-1 predictions
            nll += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def test_accuracy_task_scores_each_models_own_head(cls):
    root, f = cls
    spec = write_spec(root, '''use merging
models experts = [local("e0"), local("e1")]
data d0 = dataset("data0.jsonl", text="text", n=32)
data d1 = dataset("data1.jsonl", text="text", n=32)
data test0 = dataset("data0.jsonl", text="text", label="label")
task t0 = accuracy(test0, batch_size=16)
merge rm = regmean(experts, [d0, d1])
merge soup = average(experts)
save rm to "out/rm"
eval rm, soup, experts on t0 to "rep"
''', "acc.fuse")
    rc, out, err = run_cli("run", str(spec))
    assert rc == 0, err
    assert "Traceback" not in err
    report = json.loads((root / "rep" / "report.json").read_text())
    rows = [json.loads(x) for x in (root / "data0.jsonl").read_text().splitlines()]
    assert set(report["rows"]) == {"rm", "soup", "e0", "e1"}  # no zoo reference rows
    for name, d in (("e0", f["e0"]), ("e1", f["e1"]), ("rm", root / "out" / "rm")):
        assert report["rows"][name]["accuracy"]["t0"] == pytest.approx(_accuracy(d, rows), abs=1e-9), name
    assert "t0" in out + err and (root / "rep" / "report.png").is_file()


def test_accuracy_task_reports_the_mean_cross_entropy(cls):
    """The loss a search minimises on an accuracy() task: −log softmax at the label, by
    hand, one row at a time (no padding), against the batched evaluation."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fusionlang.eval.evaluation import resolve_task, score_task
    from fusionlang.lang.checker import check_file

    root, f = cls
    spec = write_spec(root, '''data test0 = dataset("data0.jsonl", text="text", label="label")
task t0 = accuracy(test0, batch_size=5)
''', "loss.fuse")
    prog = check_file(str(spec))
    task = resolve_task(prog, next(q for q, b in prog.bindings.items() if b.kind == "task"))
    res = score_task(str(f["e0"]), task, "cpu")
    rows = [json.loads(x) for x in (root / "data0.jsonl").read_text().splitlines()]
    m = AutoModelForSequenceClassification.from_pretrained(str(f["e0"])).eval()
    tok = AutoTokenizer.from_pretrained(str(f["e0"]))
    nll = 0.0
    with torch.no_grad():
        for r in rows:
            logits = m(**tok([r["text"]], return_tensors="pt")).logits[0].double()
            nll += float(logits.exp().sum().log() - logits[r["label"]])
    assert res["loss"] == pytest.approx(nll / len(rows), abs=1e-5)
    assert res["accuracy"] == pytest.approx(_accuracy(f["e0"], rows), abs=1e-9)


def test_perplexity_task_of_causal_lms(lm):
    root, f = lm
    spec = write_spec(root, '''use merging
model base = local("base")
models experts = [local("e0"), local("e1")]
data held_out = dataset("lm.jsonl", text="text")
task ppl = perplexity(held_out, batch_size=7)
merge ta = task_arithmetic(base, experts, scale=0.5)
save ta to "out/ta"
eval ta, base on ppl to "rep"
''', "ppl.fuse")
    rc, out, err = run_cli("run", str(spec))
    assert rc == 0, err
    report = json.loads((root / "rep" / "report.json").read_text())
    texts = [json.loads(x)["text"] for x in (root / "lm.jsonl").read_text().splitlines()]
    for name, d in (("base", f["base"]), ("ta", root / "out" / "ta")):
        got = report["rows"][name]["perplexity"]["ppl"]
        assert got == pytest.approx(_perplexity(d, texts), rel=1e-4), name
        assert report["rows"][name]["loss"]["ppl"] == pytest.approx(math.log(got), rel=1e-9)
    assert report["perplexity_tasks"] == ["ppl"] and "ppl (ppl)" in out + err


@pytest.mark.parametrize("cmd", ["compile", "run"])
def test_models_that_cannot_run_a_task_are_refused_before_running(cls, lm, cmd):
    root, _ = cls
    (root / "labels9.jsonl").write_text("\n".join(json.dumps({"text": "the cat", "label": k}) for k in (0, 9)) + "\n")
    spec = write_spec(root, f'''use merging
models experts = [local("e0"), local("e1")]
model llm = local("{lm[1]["base"]}")
task far = accuracy(dataset("labels9.jsonl", text="text", label="label"))
task ppl = perplexity(dataset("data0.jsonl", text="text"))
merge soup = average(experts)
eval soup on far
eval llm on far
eval soup on ppl
''', f"bad_{cmd}.fuse")
    rc, _, err = run_cli(cmd, str(spec))
    assert rc == 1 and "Traceback" not in err, err
    assert "the data has label 9 but 'soup''s head knows 3 classes" in err
    assert "'llm' (LlamaForCausalLM) has no classification head" in err
    assert "'soup' (BertForSequenceClassification) is not a causal language model" in err
    assert [c for _, _, c in error_locations(err)] == ["E014", "E014", "E014"], err
    assert not (root / f"bad_{cmd}-report").exists()
    # a task's own mistakes come first, at the data value
    spec = write_spec(root, 'use merging\nmodels experts = [local("e0"), local("e1")]\n'
                      'task nolabel = accuracy(dataset("data0.jsonl", text="text"))\n'
                      'merge soup = average(experts)\neval soup on nolabel\n', f"nolabel_{cmd}.fuse")
    rc, _, err = run_cli(cmd, str(spec))
    assert rc == 1 and error_locations(err) == [(3, 25, "E006")] and "needs labeled data" in err, err


def test_tune_on_a_user_accuracy_task_and_not_on_perplexity(cls, lm):
    root, f = cls
    spec = write_spec(root, '''use merging
models experts = [local("e0"), local("e1")]
task t1 = accuracy(dataset("data1.jsonl", text="text", label="label", n=24))
merge w = linear(experts, [tune([0.0, 1.0], on=[t1]), 1.0])
eval w on t1 to "rep_tune"
''', "tune.fuse")
    rc, _, err = run_cli("run", str(spec))
    assert rc == 0, err
    report = json.loads((root / "rep_tune" / "report.json").read_text())
    rec = report["tuning"][0]
    rows = [json.loads(x) for x in (root / "data1.jsonl").read_text().splitlines()][:24]
    # candidate 0.0 is expert e1 alone: its score is e1's accuracy on those rows
    by_value = {c["values"]["weights[0]"] if "weights[0]" in c["values"] else next(iter(c["values"].values())): c
                for c in rec["candidates"]}
    assert by_value[0.0]["average"] == pytest.approx(_accuracy(f["e1"], rows), abs=1e-9)
    spec = write_spec(lm[0], '''use merging
model base = local("base")
models experts = [local("e0"), local("e1")]
task ppl = perplexity(dataset("lm.jsonl", text="text"))
merge ta = task_arithmetic(base, experts, scale=tune([0.2, 0.5], on=[ppl]))
eval ta on ppl
''', "tune_ppl.fuse")
    rc, _, err = run_cli("compile", str(spec))
    assert rc == 1 and error_locations(err) == [(5, 69, "E019")] and "perplexity() task" in err, err


def _greedy_first_word(model_dir, prompt: str, steps: int = 3) -> str:
    """The first word of a model's greedy continuation of `prompt`, decoded one row at a
    time with no padding (independent of the batched, left-padded generate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok([prompt], return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, m(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    words = tok.decode(ids[0, n:], skip_special_tokens=True).split()
    return words[0] if words else ""


def test_exact_match_task_scores_greedy_answers(lm):
    """exact_match(): half the answers are the base's own greedy next word, half another
    word; each model's score is the fraction of rows whose independently decoded first
    word is the answer (rows of different lengths: left padding must not change it)."""
    from conftest import WORDS

    root, f = lm
    prompts = [json.loads(x)["text"] for x in (root / "lm.jsonl").read_text().splitlines()][:12]
    base_words = [_greedy_first_word(f["base"], p) for p in prompts]
    answers = [w if i % 2 == 0 else next(x for x in WORDS if not w.startswith(x) and not x.startswith(w))
               for i, w in enumerate(base_words)]
    with open(root / "qa.jsonl", "w") as fh:
        fh.writelines(json.dumps({"q": p, "a": a}) + "\n" for p, a in zip(prompts, answers, strict=True))
    spec = write_spec(root, '''use merging
model base = local("base")
models experts = [local("e0"), local("e1")]
task qa = exact_match(dataset("qa.jsonl", prompt="q", answer="a"), batch_size=5)
merge ta = task_arithmetic(base, experts, scale=0.5)
save ta to "out/ta_em"
eval base, ta on qa to "rep_em"
''', "em.fuse")
    rc, out, err = run_cli("run", str(spec))
    assert rc == 0, err
    report = json.loads((root / "rep_em" / "report.json").read_text())
    assert report["exact_match_tasks"] == ["qa"] and "qa (EM)" in out + err
    assert report["rows"]["base"]["accuracy"]["qa"] == 0.5
    ta_words = [_greedy_first_word(root / "out" / "ta_em", p) for p in prompts]
    want = sum(w == a for w, a in zip(ta_words, answers, strict=True)) / len(prompts)
    assert report["rows"]["ta"]["accuracy"]["qa"] == pytest.approx(want, abs=1e-12)


def test_exact_match_errors_are_located(cls, lm):
    root, _ = lm
    (root / "qa_bad.jsonl").write_text(json.dumps({"q": "the cat", "a": "sat"}) + "\n")
    spec = write_spec(root, f'''use merging
model base = local("base")
model bert = local("{cls[1]["e0"]}")
task noanswer = exact_match(dataset("qa_bad.jsonl", prompt="q"))
task qa = exact_match(dataset("qa_bad.jsonl", prompt="q", answer="a"), max_new_tokens=0)
eval base on noanswer
''', "em_bad.fuse")
    rc, _, err = run_cli("compile", str(spec))
    assert rc == 1 and "Traceback" not in err, err
    assert error_locations(err) == [(4, 29, "E006"), (5, 87, "E006")], err
    assert "name their columns with answer=" in err and "max_new_tokens=0" in err
    spec = write_spec(root, f'''use merging
model bert = local("{cls[1]["e0"]}")
task em = exact_match(dataset("qa_bad.jsonl", prompt="q", answer="a"))
eval bert on em
''', "em_bad2.fuse")
    rc, _, err = run_cli("compile", str(spec))
    assert rc == 1 and "Traceback" not in err, err
    assert "'bert' (BertForSequenceClassification) is not a causal language model, so it cannot generate" in err
    spec = write_spec(root, f'''use merging
model bert = local("{cls[1]["e0"]}")
data qa = dataset("qa_bad.jsonl", prompt="q", answer="a")
merge g = regmean([bert, bert], data=qa)
save g to "out/g"
''', "em_bad3.fuse")
    rc, _, err = run_cli("compile", str(spec))
    assert rc == 1 and "Traceback" not in err and error_locations(err) == [(3, 11, "E006")], err
    assert "gram() runs the models on the data's inputs" in err, err
