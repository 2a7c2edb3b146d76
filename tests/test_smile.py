"""SMILE upscaling (`smile(...)`): conformance with FusionBench 0.2.33's own
`SmileUpscalingAlgorithm` (its venv, .ci/install_fusionbench.sh) on tiny BERT models —
the factor tensors (up to the sign of each singular pair) and the upscaled model's
outputs; an independent invariant (one expert at full rank is that expert); the
description `fusionlang.load` rebuilds the model from; parameter counts; located errors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_state, make_family, run_cli, run_reference, write_spec

FB_PYTHON = REPO / ".venv-fusionbench/bin/python"
if not FB_PYTHON.is_file() and os.environ.get("CI"):
    raise RuntimeError("FusionBench is required on CI: run `bash .ci/install_fusionbench.sh`")
needs_fb = pytest.mark.skipif(not FB_PYTHON.is_file(), reason="FusionBench not installed")
INPUT_IDS = [[1, 5, 9, 33, 2, 7, 8], [4, 4, 60, 70, 80, 90, 3]]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("smile")
    return root, make_family(root, "bert", n_experts=3, noise=0.05, seed=3)


def _smile(root: Path, name: str, args: str, experts: str = '[local("e0"), local("e1"), local("e2")]'):
    spec = write_spec(root, f'''model base = local("base")
models experts = {experts}
merge {name} = smile(base, experts{args})
save {name} to "out/{name}"
''', f"{name}.fuse")
    rc, _, err = run_cli("run", str(spec))
    assert rc == 0, err
    return root / "out" / name


def _fusionbench(root: Path, name: str, experts: list[str], **cfg) -> dict:
    out = root / f"fb_{name}.safetensors"
    conf = root / f"fb_{name}.json"
    conf.write_text(json.dumps({"method": "smile", "base": str(root / "base"), "experts": [str(root / e) for e in experts],
                                "input_ids": INPUT_IDS, "out": str(out), **cfg}))
    run_reference(FB_PYTHON, REPO / "tests/reference/fusionbench_mixing.py", conf)
    from safetensors.torch import load_file

    return load_file(out)


def _outputs(model_dir: Path) -> dict[str, torch.Tensor]:
    import fusionlang

    model = fusionlang.load(model_dir)
    with torch.no_grad():
        o = model(input_ids=torch.tensor(INPUT_IDS))
    return {"last_hidden_state": o.last_hidden_state, "pooler_output": o.pooler_output}


def _signed(a: torch.Tensor, b: torch.Tensor, axis: int) -> torch.Tensor:
    """`a` with each singular vector (a column of u: axis 0; a row of svh / gate: axis
    1) flipped to the sign of `b`'s: an SVD fixes them only up to a common sign."""
    return a * torch.sign((a * b).sum(axis, keepdim=True))


@needs_fb
@pytest.mark.parametrize("k,gate_k,top_k,use_diff,average", [(4, 2, 1, True, False), (8, 1, 2, False, False),
                                                              (0, 3, 2, True, False)])
def test_smile_matches_fusionbench(fam, k, gate_k, top_k, use_diff, average):
    root, _ = fam
    name = f"sm_{k}_{gate_k}_{top_k}_{int(use_diff)}_{int(average)}"
    out = _smile(root, name, f", k={k}, gate_k={gate_k}, top_k={top_k}, routing_use_diff={str(use_diff).lower()}, "
                             f"average_experts={str(average).lower()}")
    # FusionBench's k < 0 (its k = 0 would crash) is the whole task vector, as our k ≤ 0
    ref = _fusionbench(root, name, ["e0", "e1", "e2"], k=k if k > 0 else -1, gate_k=gate_k, top_k=top_k,
                       routing_use_diff=use_diff, average_experts=average)
    mine = load_state(out)
    outputs = _outputs(out)
    for key, v in outputs.items():
        assert float((v - ref[f"output.{key}"]).abs().max()) < 1e-5, key
    desc = json.loads((out / "fusionlang_model.json").read_text())
    upscaled = sorted(desc["modules"])
    assert upscaled == sorted({k.split(".gate.weights")[0] for k in ref if k.endswith(".gate.weights")})
    assert "pooler.dense" in upscaled and len(upscaled) == 3 * 6 + 1  # every nn.Linear, as FusionBench
    worst = worst_truth = 0.0
    for key, b in ref.items():
        if key.startswith("output."):
            continue
        if ".gate.weights" in key:
            layer = key.split(".gate.weights")[0]
            a = _signed(mine[f"{layer}.smile_gate"].reshape(b.shape), b, 1)
        elif ".pretrained_model." in key:
            a = mine[key.replace(".pretrained_model", "")]
        elif ".experts." in key:
            layer, rest = key.split(".experts.")
            i, part = rest.split(".")
            if k <= 0:  # FusionBench keeps the whole task vector as a Linear: compare u·svh with it
                if part == "weight":
                    a = mine[f"{layer}.smile_u"][int(i)] @ mine[f"{layer}.smile_svh"][int(i)]
                else:
                    a = mine[f"{layer}.smile_bias"][int(i)]
            else:
                a = mine[f"{layer}.smile_{part}"][int(i)]
                a = _signed(a, b, 0) if part == "u" else _signed(a, b, 1) if part == "svh" else a
                if part in ("u", "svh"):  # the factors themselves, against a float64 SVD
                    truth = _truth_factor(fam[1], layer, int(i), part, k)
                    worst_truth = max(worst_truth, float((a.double() - _signed(truth, b.double(), 0 if part == "u"
                                                                               else 1)).abs().max()))
        else:
            a = mine[key]
        worst = max(worst, float((a - b).abs().max()))
    # FusionBench's float32 LAPACK SVD is off the float64 factors by up to 8.3e-5 on this
    # family (k = 8: σ_8 and σ_9 are close), fusionlang's float64 Gram route by < 1e-7
    assert worst < 2e-4
    assert worst_truth < 5e-7, worst_truth


def _truth_factor(f: dict, layer: str, expert: int, part: str, k: int) -> torch.Tensor:
    """SMILE's u [out, k] or svh [k, in] of one expert's Linear from a float64 SVD."""
    name = layer.removeprefix("model.") + ".weight"
    base, ft = load_state(f["base"]), load_state(f[f"e{expert}"])
    key = next(x for x in base if x.endswith(name))
    u, s, vh = torch.linalg.svd(ft[key].double() - base[key].double(), full_matrices=False)
    return u[:, :k] if part == "u" else s[:k, None] * vh[:k]


def test_one_expert_at_full_rank_is_that_expert(fam):
    """Independent of FusionBench: with one expert, top-1 routing gives it weight 1, and
    at full rank its factors are its whole task vector, so every Linear computes the
    expert's own layer; average_experts takes the expert's other tensors."""
    root, f = fam
    out = _smile(root, "one", ", k=0, average_experts=true", experts='[local("e1")]')
    from transformers import AutoModel

    expert = AutoModel.from_pretrained(f["e1"]).eval()
    with torch.no_grad():
        want = expert(input_ids=torch.tensor(INPUT_IDS)).last_hidden_state
    got = _outputs(out)["last_hidden_state"]
    assert float((got - want).abs().max()) < 1e-4
    base = AutoModel.from_pretrained(f["base"]).eval()
    with torch.no_grad():
        assert float((base(input_ids=torch.tensor(INPUT_IDS)).last_hidden_state - want).abs().max()) > 1e-2


def test_average_experts_averages_the_other_tensors(fam):
    """FusionBench's average_experts=true crashes on any model with a parameterless leaf
    module (its simple_average of a Dropout's empty state dict raises), so this checks
    against the experts' files directly: every tensor outside an upscaled Linear is the
    experts' mean, every upscaled Linear keeps the base's weight and bias."""
    root, f = fam
    out = _smile(root, "avg", ", k=2, average_experts=true")
    mine = load_state(out)
    experts = [load_state(f[e]) for e in ("e0", "e1", "e2")]
    base = load_state(f["base"])
    linears = set(json.loads((out / "fusionlang_model.json").read_text())["modules"])
    checked = 0
    for name, v in base.items():
        if name.rsplit(".", 1)[0] in linears:
            assert torch.equal(mine[name], v), name
        else:
            want = sum(e[name].double() for e in experts) / 3
            assert float((mine[name].double() - want).abs().max()) < 1e-6, name
            checked += 1
    assert checked >= 3 * 4 + 5  # LayerNorms of each layer, the embeddings and their norm


def test_compile_shows_parameter_counts_and_one_svd_per_expert_and_layer(fam):
    root, _ = fam
    spec = write_spec(root, '''model base = local("base")
models experts = [local("e0"), local("e1"), local("e2")]
merge up = smile(base, experts, k=4, top_k=2, linears=["*.intermediate.dense", "*.output.dense"])
save up to "out/counted"
''', "counted.fuse")
    rc, out, err = run_cli("compile", str(spec), "-q", "--emit", "json")
    assert rc == 0, err
    plan = json.loads(out)
    ops = [n["op"] for n in plan["nodes"]]
    # intermediate.dense, output.dense and attention.output.dense of 3 layers: 9 layers x 3 experts
    assert ops.count("smile_factors") == 27
    note = plan["outputs"][0]["note"]
    rc, _, err = run_cli("run", str(spec))
    assert rc == 0, err
    state = load_state(root / "out/counted")
    total = sum(v.numel() for v in state.values())
    active = sum(v.numel() * 2 // 3 if re.search(r"smile_(u|svh|bias)$", k) else v.numel() for k, v in state.items())
    assert f"{total / 1e3:.2f}K parameters" in note and f"{active / 1e3:.2f}K active per token" in note
    desc = json.loads((root / "out/counted/fusionlang_model.json").read_text())
    assert len(desc["modules"]) == 9 and all(m["top_k"] == 2 and m["k"] == 4 for m in desc["modules"].values())


@pytest.mark.parametrize("args,code,hint", [
    (', linears=["*.nothing"]', "E008", "encoder.layer.0"),
    (", top_k=4", "E006", "at most 3"),
    (", k=1.5", "E005", "whole number"),
    (", gate_k=0", "E006", "at least 1"),
])
def test_smile_mistakes_are_located(fam, args, code, hint):
    root, _ = fam
    spec = write_spec(root, f'''model base = local("base")
models experts = [local("e0"), local("e1"), local("e2")]
merge up = smile(base, experts{args})
save up to "out/bad"
''', "bad.fuse")
    rc, _, err = run_cli("run", str(spec))
    assert rc == 1 and code in err and hint in err and "Traceback" not in err
    assert re.search(r"bad\.fuse:3:\d+", err)
    assert not (root / "out/bad").exists()


def test_smile_inside_an_expression_is_refused(fam):
    root, _ = fam
    spec = write_spec(root, '''model base = local("base")
models experts = [local("e0"), local("e1")]
merge up = 0.5 * smile(base, experts)
save up to "out/bad2"
''', "bad2.fuse")
    rc, _, err = run_cli("run", str(spec))
    assert rc == 1 and "E005" in err and "whole value of a merge" in err


def test_a_smile_causal_lm_loads_and_generates_as_its_one_expert(tmp_path):
    """SMILE on a causal LM: `fusionlang.load` rebuilds it and `generate` runs; with one
    expert at full rank its greedy continuation is the expert's, token for token (and
    an exact_match() task in the spec scores it like any causal LM)."""
    import json

    from conftest import make_causal_family

    import fusionlang

    f = make_causal_family(tmp_path, n_experts=1, seed=9)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"q": q, "a": "the"}) + "\n"
                                               for q in ("the cat sat on", "a big dog ran")))
    spec = write_spec(tmp_path, '''model base = local("base")
model e0 = local("e0")
merge s = smile(base, [e0], k=0, average_experts=true)
task qa = exact_match(dataset("qa.jsonl", prompt="q", answer="a"))
save s to "out/s"
eval s, e0 on qa to "rep"
''', "smile_lm.fuse")
    rc, _, err = run_cli("run", str(spec))
    assert rc == 0, err
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())["rows"]
    assert rows["s"]["accuracy"]["qa"] == rows["e0"]["accuracy"]["qa"]
    from transformers import AutoModelForCausalLM

    model = fusionlang.load(tmp_path / "out" / "s")
    expert = AutoModelForCausalLM.from_pretrained(f["e0"]).eval()
    ids = torch.tensor([[4, 9, 17, 6, 22]])
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        want = expert.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert float((model(ids).logits - expert(ids).logits).abs().max()) < 1e-4
    assert got.tolist() == want.tolist()
