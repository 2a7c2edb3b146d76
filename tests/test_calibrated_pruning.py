"""Wanda and SparseGPT (issue 11 §3) against FusionBench 0.2.33's own classes
(tests/reference/fusionbench_pruning.py) on a tiny Llama and the same calibration tokens,
plus properties that need no reference: the sparsity pattern, that the data changed the
choice (not magnitude pruning), that SparseGPT updates the weights it keeps, that the
layers are measured on the pruned layers below, and the located errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import (
    FUSIONBENCH_PYTHON,
    REPO,
    WORDS,
    load_state,
    needs_fusionbench,
    run_cli,
    run_reference,
    word_llama,
    word_tokenizer,
    write_spec,
)
from test_errors import expect_error

STACK = "model.layers."


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A tiny Llama (hidden 32, MLP 160: down_proj has 160 input columns, two SparseGPT
    blocks of 128) and 12 calibration sentences of 10 words (10 tokens: no padding, as
    FusionBench's fixed-length samples)."""
    root = tmp_path_factory.mktemp("calibrated")
    _, vocab = word_tokenizer()
    word_llama(root / "base", 5, hidden_size=32, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4)
    rng = random.Random(1)
    rows = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(12)]
    (root / "calib.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return root, [[vocab[w] for w in r.split()] for r in rows]


def ours(root: Path, call: str, name: str) -> dict[str, torch.Tensor]:
    spec = write_spec(root, f'''use merging
model m = local("base")
data calib = dataset("calib.jsonl", text="text")
merge {name} = {call}
save {name} to "out/{name}"
''', f"{name}.fuse")
    rc, _, err = run_cli("run", str(spec), "-q")
    assert rc == 0, err
    return load_state(root / "out" / name)


def fusionbench(root: Path, ids: list, method: str, name: str, **params) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = root / f"fb_{name}.safetensors"
    (root / f"fb_{name}.json").write_text(json.dumps({"method": method, "model": str(root / "base"), "input_ids": ids,
                                                      "params": params, "out": str(out)}))
    run_reference(FUSIONBENCH_PYTHON, REPO / "tests/reference/fusionbench_pruning.py", root / f"fb_{name}.json")
    return load_file(str(out))


def pruned(k: str) -> bool:
    return k.startswith(STACK) and k.endswith("proj.weight")


CASES = [
    ("wanda", "wanda_u50", {"prune_type": "unstructured", "sparsity_ratio": 0.5, "n": 2, "m": 4}, "prune_type=\"unstructured\", sparsity_ratio=0.5"),
    ("wanda", "wanda_u25", {"prune_type": "unstructured", "sparsity_ratio": 0.25, "n": 2, "m": 4}, "sparsity_ratio=0.25"),
    ("wanda", "wanda_24", {"prune_type": "semistructured", "sparsity_ratio": 0.5, "n": 2, "m": 4}, "prune_type=\"semistructured\""),
    ("sparsegpt", "sgpt_u50", {"prune_type": "unstructured", "sparsity_ratio": 0.5, "n": 0, "m": 0}, ""),
    ("sparsegpt", "sgpt_u70", {"prune_type": "unstructured", "sparsity_ratio": 0.7, "n": 0, "m": 0}, "sparsity_ratio=0.7"),
    ("sparsegpt", "sgpt_13", {"prune_type": "semistructured", "sparsity_ratio": 0.5, "n": 1, "m": 3}, "prune_type=\"semistructured\", n=1, m=3"),
]


@needs_fusionbench
@pytest.mark.parametrize("method,name,fb_params,args", CASES)
def test_matches_fusionbench(fam, method, name, fb_params, args):
    root, ids = fam
    mine = ours(root, f"{method}(m, calib{', ' if args else ''}{args})", name)
    ref = fusionbench(root, ids, method, name, **fb_params)
    base = load_state(root / "base")
    assert set(mine) == set(base)
    for k, v in mine.items():
        if not pruned(k):
            assert torch.equal(v, base[k]), k  # outside the stack's Linear weights: unchanged
            continue
        r = ref[k]
        assert torch.equal(v == 0, r == 0), (k, int(((v == 0) != (r == 0)).sum()))  # the same mask
        assert float((v - r).abs().max()) <= 1e-5 * (1 + float(r.abs().max())), k
        rows, cols = v.shape
        zeros = (v == 0).sum(dim=1)
        if method == "wanda" and fb_params["prune_type"] == "unstructured":
            assert bool((zeros == int(cols * fb_params["sparsity_ratio"])).all()), k
        elif fb_params["prune_type"] == "semistructured":
            n, m = fb_params["n"], fb_params["m"]
            assert bool((zeros == n * (cols // m) + min(n, cols % m)).all()), k
        else:  # SparseGPT: per block of 128 columns, int(numel · ratio) + 1 entries
            blocks = [(0, min(cols, 128))] + ([(128, cols)] if cols > 128 else [])
            for a, b in blocks:
                assert int((v[:, a:b] == 0).sum()) == int(rows * (b - a) * fb_params["sparsity_ratio"]) + 1, k


def test_wanda_uses_the_data_and_the_pruned_layers_below(fam):
    """Wanda's choice is not magnitude pruning's (the input norms matter), and the last
    layer's statistics are taken on the pruned layers' outputs (an independent
    computation: the unpruned model's activations give another mask)."""
    root, _ = fam
    mine = ours(root, "wanda(m, calib)", "wanda_default")
    mag = ours(root, 'magnitude_pruning(m, sparsity_ratio=0.5)', "mag")
    keys = [k for k in mine if pruned(k)]
    assert any(not torch.equal(mine[k] == 0, mag[k] == 0) for k in keys)
    # independent: input norms of the unpruned model's last layer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32).eval()
    _fast, vocab = word_tokenizer()
    rows = [json.loads(x)["text"] for x in (root / "calib.jsonl").read_text().splitlines()]
    ids = torch.tensor([[vocab[w] for w in r.split()] for r in rows])
    seen = {}
    last = model.model.layers[-1].mlp.down_proj
    h = last.register_forward_hook(lambda mod, a, o: seen.update(x=a[0].detach()))
    with torch.no_grad():
        model(ids)
    h.remove()
    w = model.model.layers[-1].mlp.down_proj.weight
    score = w.abs() * seen["x"].reshape(-1, w.shape[1]).pow(2).sum(0).sqrt()
    idx = torch.sort(score, dim=1, stable=True).indices[:, :w.shape[1] // 2]
    unpruned_mask = torch.zeros_like(w, dtype=torch.bool).scatter(1, idx, True)
    k = f"{STACK}2.mlp.down_proj.weight"
    assert not torch.equal(mine[k] == 0, unpruned_mask)
    # and the first layer, whose inputs no pruning changed, is exactly that rule
    first = model.model.layers[0].mlp.down_proj
    seen.clear()
    h = first.register_forward_hook(lambda mod, a, o: seen.update(x=a[0].detach()))
    with torch.no_grad():
        model(ids)
    h.remove()
    # all of a layer's Linear inputs are measured in one pass before that layer is pruned
    # (as FusionBench): layer 0 sees the unpruned model's activations
    w0 = first.weight
    score0 = w0.abs() * seen["x"].reshape(-1, w0.shape[1]).pow(2).sum(0).sqrt()
    idx0 = torch.sort(score0, dim=1, stable=True).indices[:, :w0.shape[1] // 2]
    expect = w0.detach().scatter(1, idx0, 0.0)
    assert torch.equal(mine[f"{STACK}0.mlp.down_proj.weight"], expect)


def test_sparsegpt_updates_the_weights_it_keeps(fam):
    root, _ = fam
    mine = ours(root, "sparsegpt(m, calib)", "sgpt_default")
    base = load_state(root / "base")
    k = f"{STACK}1.mlp.down_proj.weight"
    kept = mine[k] != 0
    assert float((mine[k][kept] - base[k][kept]).abs().max()) > 1e-4  # not only a mask
    # and a smaller reconstruction error than keeping the same entries unchanged
    # (the compensation is what SparseGPT is for), on the layer-1 MLP's own inputs
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32).eval()
    _, vocab = word_tokenizer()
    rows = [json.loads(x)["text"] for x in (root / "calib.jsonl").read_text().splitlines()]
    ids = torch.tensor([[vocab[w] for w in r.split()] for r in rows])
    # inputs of layer 1's down_proj when layer 0 is pruned as the output says
    model.load_state_dict({**model.state_dict(), **{kk: v for kk, v in mine.items() if kk.startswith(f"{STACK}0.")}})
    seen = {}
    h = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda mod, a, o: seen.update(x=a[0].detach()))
    with torch.no_grad():
        model(ids)
    h.remove()
    x = seen["x"].reshape(-1, base[k].shape[1])
    target = x @ base[k].T
    err_sgpt = float((x @ mine[k].T - target).pow(2).sum())
    err_mask = float((x @ (base[k] * kept).T - target).pow(2).sum())
    assert err_sgpt < 0.9 * err_mask


@pytest.mark.parametrize("args,code,needle", [
    ('sparsity_ratio=1.5', "E006", "sparsity_ratio"),
    ('prune_type="structured"', "E006", "prune_type"),
    ('prune_type="semistructured", n=5, m=4', "E006", "n=5"),
    ('batch_size=0', "E006", "batch_size"),
])
def test_bad_arguments_are_located(fam, args, code, needle):
    root, _ = fam
    spec = write_spec(root, f'''use merging
model m = local("base")
data calib = dataset("calib.jsonl", text="text")
merge bad = wanda(m, calib, {args})
save bad to "out/bad"
''', "bad.fuse")
    d = expect_error(run_cli("compile", str(spec)), code, line=4)
    assert needle in d["msg"] and d["col"] > len("merge bad = wanda(m, calib, "), d
