"""WEMoE (`wemoe(...)`): conformance with FusionBench 0.2.33's own `WeightEnsemblingMoE`
module, `task_arithmetic_merge` and `entropy_loss` (its venv, .ci/install_fusionbench.sh)
on tiny Llama classifiers — the routers after test-time training from the same initial
values on the same batches, and the trained model's predictions; the invariant that an
untrained router (weights init_lambda) is task arithmetic; padding does not change a
row's prediction; the description `fusionlang.load` rebuilds the model from; located
errors."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    WORDS,
    load_state,
    make_classifier_family,
    run_cli,
    run_reference,
    word_tokenizer,
    write_spec,
)

FB_PYTHON = REPO / ".venv-fusionbench/bin/python"
if not FB_PYTHON.is_file() and os.environ.get("CI"):
    raise RuntimeError("FusionBench is required on CI: run `bash .ci/install_fusionbench.sh`")
needs_fb = pytest.mark.skipif(not FB_PYTHON.is_file(), reason="FusionBench not installed")
EVAL = ["the cat sat on mat", "a dog ran under log", "red and blue big small"]


def make_llama_classifiers(root: Path, n_experts: int = 2, rows: int = 24, seed: int = 0) -> dict[str, Path]:
    """Tiny LlamaForSequenceClassification models (3 labels; base + noise experts) with the
    word-level tokenizer, and `data{k}.jsonl`: `rows` five-word sentences per expert (one
    length, so no batch is padded: FusionBench's WEMoE averages over padding)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    fast, vocab = word_tokenizer()
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, num_labels=3,
                         pad_token_id=0)
    torch.manual_seed(seed)
    state = LlamaForSequenceClassification(config).state_dict()
    out: dict[str, Path] = {}
    for i, name in enumerate(["base"] + [f"e{k}" for k in range(n_experts)]):
        g = torch.Generator().manual_seed(seed * 100 + i)
        m = LlamaForSequenceClassification(config)
        m.load_state_dict({k: v + (0.3 * torch.randn(v.shape, generator=g) if i and v.is_floating_point() else 0)
                           for k, v in state.items()})
        m.save_pretrained(root / name)
        fast.save_pretrained(root / name)
        out[name] = root / name
    rng = random.Random(seed)
    for k in range(n_experts):
        with open(root / f"data{k}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(5))}) + "\n" for _ in range(rows))
        out[f"data{k}"] = root / f"data{k}.jsonl"
    return out


@pytest.fixture(scope="module")
def llama_fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("wemoe")
    return root, make_llama_classifiers(root)


def _run(root: Path, name: str, args: str, n: int = 2) -> Path:
    experts = ", ".join(f'local("e{k}")' for k in range(n))
    data = ", ".join(f'dataset("data{k}.jsonl", text="text")' for k in range(n))
    spec = write_spec(root, f'''model base = local("base")
models experts = [{experts}]
let unlabeled = [{data}]
merge {name} = wemoe(base, experts, unlabeled{args})
save {name} to "out/{name}"
''', f"{name}.fuse")
    rc, _, err = run_cli("run", str(spec))
    assert rc == 0, err
    return root / "out" / name


def _init_routers(hidden: int, n: int, layers: int, init_lambda: float, seed: int) -> dict[str, torch.Tensor]:
    """The documented initial routers, computed here: N(0, 0.01²) weights drawn layer by
    layer (fc1 then fc2) from a generator seeded with `seed`, fc1 bias 0, fc2 bias λ."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        p = f"model.layers.{i}.mlp.gate."
        out[p + "fc1.weight"] = torch.randn((hidden, hidden), generator=g) * 0.01
        out[p + "fc1.bias"] = torch.zeros(hidden)
        out[p + "fc2.weight"] = torch.randn((n, hidden), generator=g) * 0.01
        out[p + "fc2.bias"] = torch.full((n,), init_lambda)
    return out


def _batches(texts: list[list[str]], steps: int, batch_size: int, seed: int) -> list[list[list[str]]]:
    """The documented batch order, computed here: expert i's rows in the order of
    permutations drawn from a generator seeded with seed·1000003 + i, cut in batches."""
    out = [[] for _ in range(steps)]
    for i, rows in enumerate(texts):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        order: list[int] = []
        while len(order) < steps * batch_size:
            perm = torch.randperm(len(rows), generator=g).tolist()
            for a in range(0, len(rows), batch_size):
                order.append(perm[a:a + batch_size])
        for s in range(steps):
            out[s].append([rows[k] for k in order[s]])
    return out


@needs_fb
def test_wemoe_matches_fusionbench(llama_fam):
    root, f = llama_fam
    steps, bs, lr, lam = 4, 8, 0.05, 0.3
    out = _run(root, "we", f", steps={steps}, batch_size={bs}, lr={lr}, seed=1")
    texts = [[json.loads(x)["text"] for x in Path(f[f"data{k}"]).read_text().splitlines()] for k in range(2)]
    from safetensors.torch import load_file, save_file

    save_file(_init_routers(16, 2, 2, lam, seed=1), str(root / "init.safetensors"))
    conf = root / "fb_we.json"
    conf.write_text(json.dumps({"method": "wemoe", "base": str(f["base"]), "experts": [str(f["e0"]), str(f["e1"])],
                                "init_lambda": lam, "router_hidden_layers": 2, "lr": lr,
                                "routers": str(root / "init.safetensors"), "steps": _batches(texts, steps, bs, 1),
                                "eval": EVAL, "out": str(root / "fb_we.safetensors")}))
    run_reference(FB_PYTHON, REPO / "tests/reference/fusionbench_mixing.py", conf)
    ref = load_file(str(root / "fb_we.safetensors"))
    mine = load_state(out)
    init = _init_routers(16, 2, 2, lam, seed=1)
    moved = 0.0
    for key, b in ref.items():
        if key.startswith("output."):
            continue
        a = mine[key.replace(".mlp.gate.", ".mlp.gate_proj.wemoe_router.")]
        assert float((a - b).abs().max()) < 1e-5, key
        moved = max(moved, float((b - init[key]).abs().max()))
    assert moved > 1e-3  # the routers did train
    from transformers import AutoTokenizer

    import fusionlang

    model = fusionlang.load(out)
    with torch.no_grad():
        logits = model(**AutoTokenizer.from_pretrained(out)(EVAL, return_tensors="pt")).logits
    assert float((logits - ref["output.logits"]).abs().max()) < 1e-5


def test_untrained_routers_give_task_arithmetic_and_padding_changes_nothing(tmp_path):
    """Independent of FusionBench: with router_hidden_layers=0 and one step at lr≈0 every
    expert's weight stays init_lambda, so the model is task arithmetic with that scale;
    a row padded in a batch of longer rows gets the logits it gets alone."""
    f = make_classifier_family(tmp_path, n_experts=2, dropout=0.0)
    out = _run(tmp_path, "flat", ", router_hidden_layers=0, init_lambda=0.4, steps=1, lr=1e-12")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import fusionlang

    base = load_state(f["base"])
    experts = [load_state(f["e0"]), load_state(f["e1"])]
    ta = {k: v + 0.4 * sum(e[k] - v for e in experts) if v.is_floating_point() else v for k, v in base.items()}
    ref = AutoModelForSequenceClassification.from_pretrained(f["base"]).eval()
    ref.load_state_dict(ta)
    model = fusionlang.load(out)
    tok = AutoTokenizer.from_pretrained(f["base"])
    texts = ["the cat sat", "a dog ran under the old mat and it was very happy"]
    with torch.no_grad():
        want = ref(**tok(texts, padding=True, return_tensors="pt")).logits
        got = model(**tok(texts, padding=True, return_tensors="pt")).logits
    assert float((got - want).abs().max()) < 1e-5
    # a trained (depth-2) router: the short row's logits do not depend on its batch's padding
    out2 = _run(tmp_path, "deep", ", steps=3, lr=0.01, batch_size=8")
    model = fusionlang.load(out2)
    with torch.no_grad():
        alone = model(**tok(texts[:1], return_tensors="pt")).logits[0]
        padded = model(**tok(texts, padding=True, return_tensors="pt")).logits[0]
    assert float((alone - padded).abs().max()) < 1e-5
    desc = json.loads((out2 / "fusionlang_model.json").read_text())
    routers = [m for m, s in desc["modules"].items() if s["router"]]
    assert sorted(routers) == [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    assert sorted(m for m in desc["modules"] if m.endswith("output.dense") and "attention" not in m) == [
        f"bert.encoder.layer.{i}.output.dense" for i in range(2)]


def test_compile_lists_the_router_stage_and_counts(llama_fam):
    root, _ = llama_fam
    spec = write_spec(root, '''model base = local("base")
models experts = [local("e0"), local("e1")]
merge we = wemoe(base, experts, dataset("data0.jsonl", text="text"), steps=5)
save we to "out/counted"
''', "counted.fuse")
    rc, out, err = run_cli("compile", str(spec), "-q", "--emit", "json")
    assert rc == 0, err
    plan = json.loads(out)
    stages = [s["stage"] for s in plan["sources"].values() if s["stage"]]
    assert [s["kind"] for s in stages] == ["wemoe"] and stages[0]["params"]["steps"] == 5
    assert stages[0]["estimate"]["batches"] == 10
    assert "WEMoE, 2 experts" in plan["outputs"][0]["note"]


@pytest.mark.parametrize("args,code,hint", [
    (", router_hidden_layers=3", "E006", "0 (a learned weight"),
    (", lr=0", "E006", "lr=1e-4"),
    (", steps=0", "E006", "max_steps"),
])
def test_wemoe_mistakes_are_located(llama_fam, args, code, hint):
    root, _ = llama_fam
    spec = write_spec(root, f'''model base = local("base")
models experts = [local("e0"), local("e1")]
merge we = wemoe(base, experts, dataset("data0.jsonl", text="text"){args})
save we to "out/bad"
''', "bad.fuse")
    rc, _, err = run_cli("run", str(spec))
    assert rc == 1 and code in err and hint in err and "Traceback" not in err
    assert re.search(r"bad\.fuse:3:\d+", err)
    assert not (root / "out/bad").exists()


def test_wemoe_of_a_model_without_a_known_mlp_is_refused(tmp_path):
    from conftest import make_family

    f = make_family(tmp_path, "gpt2", n_experts=2)  # GPT-2's MLP is Conv1D, not Linear
    (tmp_path / "d.jsonl").write_text('{"text": "a b"}\n')
    spec = write_spec(tmp_path, '''model base = local("base")
models experts = [local("e0"), local("e1")]
merge we = wemoe(base, experts, dataset("d.jsonl", text="text"))
save we to "out/we"
''')
    assert f
    rc, _, err = run_cli("run", str(spec))
    assert rc == 1 and "E014" in err and "no transformer MLP" in err and "Traceback" not in err
