"""`lm_eval(...)` tasks: the user's own lm-evaluation-harness YAML (data beside it),
scored on sources, merges and SMILE models in memory; the report's values against an
independent log-likelihood computation; located errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import WORDS, make_causal_family, run_cli, write_spec

pytest.importorskip("lm_eval", reason="lm-eval is a test dependency (pip install -e '.[test]')")

TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("lmeval")
    f = make_causal_family(root, n_experts=2, seed=7)
    for k in ("base", "e0", "e1"):  # BOS / EOS, as an LLM's tokenizer has (lm-eval reads them)
        tok = AutoTokenizer.from_pretrained(f[k])
        tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
        tok.save_pretrained(f[k])
    rng = random.Random(3)
    (root / "tasks").mkdir()
    docs = []
    for _ in range(12):
        choices = rng.sample(WORDS, 3)
        docs.append({"context": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))), "choices": choices,
                     "gold": rng.randrange(3)})
    (root / "tasks/mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tasks/mc.yaml").write_text(TASK)
    return root, f, docs


def _accuracy(model_dir: Path, docs: list[dict]) -> float:
    """lm-eval's multiple-choice `acc`, computed here: the choice (after a space) with
    the largest summed log-probability of its tokens given the context's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fusionlang

    model = fusionlang.load(model_dir) if (model_dir / "fusionlang_model.json").is_file() else \
        AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    right = 0
    for d in docs:
        ctx = tok(d["context"], add_special_tokens=False)["input_ids"]
        scores = []
        for c in d["choices"]:
            whole = tok(d["context"] + " " + c, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
        right += int(max(range(3), key=scores.__getitem__) == d["gold"])
    return right / len(docs)


def test_lm_eval_task_scores_sources_merges_and_smile(fam):
    root, _, docs = fam
    spec = write_spec(root, '''use merging
model base = local("base")
models experts = [local("e0"), local("e1")]
merge ta = task_arithmetic(base, experts, scale=0.5)
merge up = smile(base, experts, k=4)
task mc = lm_eval("tasks/mc.yaml", batch_size=4)
eval base, ta, up on mc to "report"
save ta to "out/ta"
save up to "out/up"
''')
    rc, _, err = run_cli("run", str(spec), "--device", "cpu")
    assert rc == 0, err
    assert "mc (acc)" in err and "Traceback" not in err and "fatal:" not in err
    report = json.loads((root / "report/report.json").read_text())
    assert report["lm_eval_tasks"]["mc"] == {"metric": "acc", "higher_is_better": True, "task": "tiny_mc"}
    rows = report["rows"]
    for name, d in (("base", root / "base"), ("ta", root / "out/ta"), ("up", root / "out/up")):
        assert rows[name]["lm_eval"]["mc"] == pytest.approx(_accuracy(d, docs), abs=1e-9), name
        assert set(rows[name]["lm_eval_results"]["mc"]) == {"acc", "acc_norm"}


def test_lm_eval_mistakes_are_located(fam):
    root, _, _ = fam
    (root / "tasks/bad.yaml").write_text("dataset_path: json\n")
    cases = [('lm_eval("tasks/nope.yaml")', "E010", "does not exist"),
             ('lm_eval("tasks/bad.yaml")', "E011", "no `task:` name"),
             ('lm_eval("tasks/mc.yaml", metric="f1")', "E006", "acc, acc_norm"),
             ('lm_eval("tasks/mc.yaml", limit=0)', "E006", "at least 1")]
    for call, code, words in cases:
        spec = write_spec(root, f'''model base = local("base")
task t = {call}
eval base on t
''', "bad.fuse")
        rc, _, err = run_cli("run", str(spec))
        assert rc == 1 and code in err and words in err and "Traceback" not in err, (call, err)
        assert "bad.fuse:2:" in err


def test_lm_eval_refuses_a_model_that_is_not_a_causal_lm(fam, tmp_path):
    from conftest import make_classifier_family

    root, _, _ = fam
    f = make_classifier_family(tmp_path, n_experts=1)
    spec = write_spec(root, f'''model clf = local("{f["base"]}")
task t = lm_eval("tasks/mc.yaml")
eval clf on t
''', "clf.fuse")
    rc, _, err = run_cli("run", str(spec))
    assert rc == 1 and "E014" in err and "not a causal language model" in err and "Traceback" not in err


def test_tune_on_an_lm_eval_task_is_refused(fam):
    """tune() chooses by accuracy or loss; an lm_eval() task reports its own metric."""
    root, _, _ = fam
    spec = write_spec(root, '''use merging
model base = local("base")
models experts = [local("e0"), local("e1")]
task t = lm_eval("tasks/mc.yaml")
merge ta = task_arithmetic(base, experts, scale=tune(between(0.1, 1.0), on=[t], budget=3))
save ta to "out/ta_tuned"
''', "tune_lm.fuse")
    for cmd in ("check", "run"):
        rc, _, err = run_cli(cmd, str(spec))
        assert rc == 1 and "Traceback" not in err, err
        assert "tune_lm.fuse:5:76: error[E019]: tune() chooses by accuracy or loss, and 't' is an lm_eval() task" in err
    assert not (root / "out/ta_tuned").exists()
