"""Mixtures of experts from dense models (`moe(...)`): conformance with mergekit-moe 0.1.5
(its own venv, .ci/install_mergekit.sh) on tiny Llama experts, routers from prompts
included; the upcycling invariant (a model made into identical experts computes the
base's logits) in every layout the installed transformers loads; located errors."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_state, make_causal_family, run_cli, write_spec

MERGEKIT_MOE = REPO / ".venv-mergekit/bin/mergekit-moe"
if not MERGEKIT_MOE.is_file() and os.environ.get("CI"):
    raise RuntimeError("MergeKit is required on CI: run `bash .ci/install_mergekit.sh`")
needs_mergekit = pytest.mark.skipif(not MERGEKIT_MOE.is_file(), reason="mergekit not installed")

PROMPTS = [["the cat sat", "a dog ran"], ["red and blue", "big and small"], ["fast then slow", "it sat on"],
           ["under the mat", "on the log"]]  # three words each: no prompt is padded


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("moe")
    f = make_causal_family(root, n_experts=4, seed=5)
    for k in ("base", "e0", "e1", "e2", "e3"):  # a BOS token, as Llama tokenizers have
        tok = AutoTokenizer.from_pretrained(f[k])
        tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
        tok.save_pretrained(f[k])
    return root, f


def _fuse(root: Path, merge: str, name: str, experts: str = '[local("e0"), local("e1"), local("e2"), local("e3")]'):
    spec = write_spec(root, f'''model base = local("base")
models experts = {experts}
merge {name} = {merge}
save {name} to "out/{name}"
''', f"{name}.fuse")
    return run_cli("run", str(spec))


def _prompts_fuse(prompts=PROMPTS) -> str:
    return "[" + ", ".join("[" + ", ".join(f'"{p}"' for p in ps) + "]" for ps in prompts) + "]"


def _mergekit_moe(root: Path, name: str, gate_mode: str, extra: dict[int, str] | None = None) -> dict:
    lines = ["base_model: ./base", f"gate_mode: {gate_mode}", "dtype: float32", "experts_per_token: 2", "experts:"]
    for k, ps in enumerate(PROMPTS):
        lines.append(f"  - source_model: ./e{k}")
        lines.append("    positive_prompts: [" + ", ".join(f'"{p}"' for p in ps) + "]")
        if extra and k in extra:
            lines.append(f"    {extra[k]}")
    cfg = root / f"{name}.yml"
    cfg.write_text("\n".join(lines) + "\n")
    out = root / "mk" / name
    r = subprocess.run([str(MERGEKIT_MOE), str(cfg), str(out), "--quiet", "--random-seed", "0"], cwd=root,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_state(out)


def _worst(mine: dict, ref: dict) -> tuple[float, str]:
    assert set(mine) == set(ref), (sorted(set(mine) ^ set(ref)))[:6]
    return max((float((mine[k].double() - ref[k].double()).abs().max()), k) for k in ref)


@needs_mergekit
@pytest.mark.parametrize("gate_mode,router_dtype", [("cheap_embed", "float32"), ("hidden", "bfloat16"),
                                                     ("hidden_avg", "bfloat16")])
def test_fused_layout_matches_mergekit_moe(fam, gate_mode, router_dtype):
    root, _ = fam
    name = f"mx_{gate_mode}"
    rc, _, err = _fuse(root, f'moe(base, experts, positive_prompts={_prompts_fuse()}, gate_mode="{gate_mode}", '
                             f'layout="fused", router_dtype="{router_dtype}", residual_scale=[1.0, 0.5, 1.0, 1.0])', name)
    assert rc == 0, err
    mine = load_state(root / "out" / name)
    ref = _mergekit_moe(root, name, gate_mode, {1: "residual_scale: 0.5"})
    worst, where = _worst(mine, ref)
    assert worst <= 1e-5, (worst, where)
    # the routers really come from the prompts: rows of unit length, different per expert
    gate = mine["model.layers.1.mlp.gate.weight"]
    assert torch.allclose(gate.norm(dim=-1), torch.ones(4), atol=5e-3)  # bfloat16 rows
    assert float((gate[0] - gate[1]).abs().max()) > 1e-2


@needs_mergekit
def test_per_expert_layout_holds_the_same_tensors(fam):
    root, _ = fam
    rc, _, err = _fuse(root, f'moe(base, experts, positive_prompts={_prompts_fuse()}, gate_mode="cheap_embed")', "mx_pe")
    assert rc == 0, err
    mine = load_state(root / "out" / "mx_pe")
    ref = _mergekit_moe(root, "mx_pe", "cheap_embed")
    for layer in range(2):
        p = f"model.layers.{layer}"
        gate_up = torch.stack([torch.cat([mine[f"{p}.block_sparse_moe.experts.{j}.w1.weight"],
                                          mine[f"{p}.block_sparse_moe.experts.{j}.w3.weight"]]) for j in range(4)])
        down = torch.stack([mine[f"{p}.block_sparse_moe.experts.{j}.w2.weight"] for j in range(4)])
        assert torch.equal(gate_up, ref[f"{p}.mlp.experts.gate_up_proj"])
        assert torch.equal(down, ref[f"{p}.mlp.experts.down_proj"])
        assert torch.allclose(mine[f"{p}.block_sparse_moe.gate.weight"], ref[f"{p}.mlp.gate.weight"], atol=1e-6)
    assert not any(".mlp." in k for k in mine)  # no dense MLP tensor is left behind


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_upcycling_identical_experts_computes_the_base(fam, layout):
    from transformers import AutoModelForCausalLM

    root, f = fam
    name = f"up_{layout}"
    rc, _out, err = _fuse(root, f'moe(base, [base, base, base, base], gate_mode="random", layout="{layout}", '
                               'allow_identical=true, seed=3)', name)
    assert rc == 0, err
    moe = AutoModelForCausalLM.from_pretrained(root / "out" / name).eval()
    base = AutoModelForCausalLM.from_pretrained(f["base"]).eval()
    assert type(moe).__name__ == "MixtralForCausalLM"
    ids = torch.tensor([[2, 5, 9, 14, 7, 30, 11]])
    with torch.no_grad():
        a, b = moe(ids).logits, base(ids).logits
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
        g1 = moe.generate(ids, max_new_tokens=6, do_sample=False)
        g2 = base.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(g1, g2)
    # the random router is seeded: the same spec writes the same router
    gate = load_state(root / "out" / name)
    key = next(k for k in gate if k.endswith("gate.weight"))
    rc, _, err = _fuse(root, f'moe(base, [base, base, base, base], gate_mode="random", layout="{layout}", '
                             'allow_identical=true, seed=3)', name + "_again")
    assert rc == 0, err
    assert torch.equal(gate[key], load_state(root / "out" / (name + "_again"))[key])


def test_compile_shows_the_router_stage_and_parameter_counts(fam):
    root, _ = fam
    spec = write_spec(root, f'''model base = local("base")
models experts = [local("e0"), local("e1"), local("e2"), local("e3")]
merge mx = moe(base, experts, positive_prompts={_prompts_fuse()}, experts_per_token=1)
save mx to "out/cmp"
''', "cmp.fuse")
    rc, text, err = run_cli("compile", str(spec), "--emit", "text")
    assert rc == 0, err
    assert 'router(base, 4 experts\' prompts; mode="hidden", dtype="float32", seed=0)' in text, text
    # every expert counts in the total, one expert's MLP per token in the active count
    from conftest import load_state as ls

    base = ls(root / "base")
    mlp = sum(v.numel() for k, v in base.items() if ".mlp." in k)
    rest = sum(v.numel() for k, v in base.items() if ".mlp." not in k) + 2 * 4 * 16
    m = re.search(r"4 experts, top-1: ([\d.]+)K parameters, ([\d.]+)K active", text)
    assert m, text
    assert float(m.group(1)) == pytest.approx((rest + 4 * mlp) / 1e3, abs=0.01)
    assert float(m.group(2)) == pytest.approx((rest + mlp) / 1e3, abs=0.01)


def _errors(text: str) -> list[tuple[int, int, str]]:
    return [(int(m[1]), int(m[2]), m[3]) for m in re.finditer(r"\.fuse:(\d+):(\d+): (?:error|warning)\[([EW]\d+)\]", text)]


# `at`: the text the error points at (its first character)
@pytest.mark.parametrize("merge,at,code,words", [
    ('moe(base, [base, base], gate_mode="random")', "[base", "E006", "experts 0 and 1 are the same model"),
    ('moe(base, experts, positive_prompts=[["the cat"], ["the cat"], ["a"], ["b"]])', "[[", "E006",
     "experts 0 and 1 have the same prompts"),
    ('moe(base, experts, positive_prompts=[["a"], ["b"]])', "[[", "E006", "2 entries for 4 experts"),
    ('moe(base, experts, gate_mode="random", experts_per_token=5)', "5", "E006", "there are 4 experts"),
    ('moe(base, experts, gate_mode="hiden")', '"hiden"', "E006", "gate_mode='hiden' is not one of"),
    ('moe(base, experts)', "moe(", "E006", "needs positive_prompts"),
    ('moe(base, experts, gate_mode="random", noise_scale=[0.1])', "[0.1]", "E006", "1 values for 4 experts"),
    ('moe(base, experts, gate_mode="random", layout="packed")', '"packed"', "E006", "layout='packed'"),
    ('moe(local("bert"), experts, gate_mode="random")', "moe(", "E014",
     "'bert' is a bert model, and a mixtral MoE is built from llama or mistral models"),
    ('moe(base, experts, gate_mode="random") + base', "moe(", "E005", "whole value of a merge"),
])
def test_bad_moe_is_a_located_error(fam, merge, at, code, words):
    root, _ = fam
    if "bert" in merge and not (root / "bert").exists():
        from conftest import make_classifier_family

        sub = root / "bertfam"
        sub.mkdir()
        (root / "bert").symlink_to(make_classifier_family(sub, n_experts=1)["base"])
    spec = write_spec(root, f'''model base = local("base")
models experts = [local("e0"), local("e1"), local("e2"), local("e3")]
merge bad = {merge}
save bad to "out/bad"
''', "bad.fuse")
    rc, _, err = run_cli("compile", str(spec))
    assert rc == 1 and words in err, err
    assert _errors(err)[0] == (3, len("merge bad = ") + merge.index(at) + 1, code), err
    assert "Traceback" not in err
    assert not (root / "out" / "bad").exists()


def test_a_copied_expert_is_refused_and_a_changed_copy_is_not(fam):
    """Experts from different directories with the same MLP bytes are the same expert; one
    changed value anywhere in one MLP tensor makes them different (a full comparison
    follows the sampled one)."""
    import shutil

    from safetensors.torch import load_file, save_file

    root, _ = fam
    for name in ("e1copy", "e1changed"):
        shutil.rmtree(root / name, ignore_errors=True)
        shutil.copytree(root / "e1", root / name)
    f = root / "e1changed" / "model.safetensors"
    state = load_file(f)
    key = next(k for k in sorted(state) if k.endswith("mlp.down_proj.weight"))
    flat = state[key].flatten().clone()
    flat[flat.numel() // 3] += 1.0
    state[key] = flat.view(state[key].shape)
    save_file(state, f, metadata={"format": "pt"})
    spec = write_spec(root, '''model base = local("base")
merge bad = moe(base, [local("e0"), local("e1"), local("e1copy")], gate_mode="random")
save bad to "out/copied"
''', "copied.fuse")
    rc, _, err = run_cli("compile", str(spec))
    assert rc == 1 and "experts 1 and 2 are the same model (their MLP weights are equal byte for byte" in err, err
    assert _errors(err)[0] == (2, len("merge bad = moe(base, ") + 1, "E006"), err
    spec = write_spec(root, '''model base = local("base")
merge ok = moe(base, [local("e0"), local("e1"), local("e1changed"), local("e2")], gate_mode="random")
save ok to "out/changed"
''', "changed.fuse")
    rc, _, err = run_cli("compile", str(spec))
    assert rc == 0, err


def test_a_router_stage_that_fails_leaves_nothing_behind(fam):
    """The router stage runs in the background while the tensors that need no router are
    written; when it fails (a base without a tokenizer), the run ends with its located
    error and neither output exists, not even the merge that needed no stage."""
    import shutil

    root, _ = fam
    shutil.rmtree(root / "notok", ignore_errors=True)
    (root / "notok").mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(root / "base" / f, root / "notok" / f)
    spec = write_spec(root, f'''model base = local("notok")
models experts = [local("e0"), local("e1"), local("e2"), local("e3")]
merge soup = (base + experts[0]) / 2
merge mx = moe(base, experts, positive_prompts={_prompts_fuse()})
save soup to "out/notok_soup"
save mx to "out/notok_mx"
''', "notok.fuse")
    rc, _, err = run_cli("run", str(spec))
    assert rc == 1 and "Traceback" not in err, err
    assert "the base model has no tokenizer to read the router prompts with" in err and "error[E014]" in err, err
    assert _errors(err)[0][0] == 4, err
    assert not (root / "out" / "notok_mx").exists() and not (root / "out" / "notok_soup").exists()
    left = [p.name for p in (root / "out").iterdir() if p.name.startswith(".")] if (root / "out").exists() else []
    assert not left, left


def test_three_experts_warn_and_nearly_parallel_routers_warn(fam):
    root, _ = fam
    prompts = [["the cat sat"], ["a dog sat"], ["red and blue"]]  # the same last token: one layer-0 row
    rc, _out, err = _fuse(root, f'moe(base, experts, positive_prompts={_prompts_fuse(prompts)})', "three",
                         experts='[local("e0"), local("e1"), local("e2")]')
    assert rc == 0, err
    assert "warning[W003]: 3 experts is not a power of two" in err
    assert "the router is badly conditioned" in err and "'the cat sat'" in err, err


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Tiny Qwen2ForCausalLM models (q/k/v biases): base + 4 noise experts, with the
    word-level tokenizer (BOS [CLS])."""
    from conftest import word_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("qwen")
    fast, vocab = word_tokenizer()
    fast.bos_token, fast.eos_token = "[CLS]", "[SEP]"
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(8)
    state = Qwen2ForCausalLM(config).state_dict()
    for i, name in enumerate(["base", "e0", "e1", "e2", "e3"]):
        g = torch.Generator().manual_seed(800 + i)
        m = Qwen2ForCausalLM(config)
        m.load_state_dict({k: v + (0.05 * torch.randn(v.shape, generator=g) if i and v.is_floating_point() else 0)
                           for k, v in state.items()})
        m.save_pretrained(root / name)
        fast.save_pretrained(root / name)
    return root


SHARED = ["the big dog", "a small cat"]


def _mergekit_qwen(root: Path, name: str, gate_mode: str) -> dict:
    lines = ["base_model: ./base", f"gate_mode: {gate_mode}", "dtype: float32", "experts_per_token: 2",
             "architecture: Qwen MoE", "shared_experts:", "  - source_model: ./base",
             "    positive_prompts: [" + ", ".join(f'"{p}"' for p in SHARED) + "]", "experts:"]
    for k, ps in enumerate(PROMPTS):
        lines += [f"  - source_model: ./e{k}", "    positive_prompts: [" + ", ".join(f'"{p}"' for p in ps) + "]"]
    (root / f"{name}.yml").write_text("\n".join(lines) + "\n")
    r = subprocess.run([str(MERGEKIT_MOE), f"{name}.yml", f"mk/{name}", "--quiet"], cwd=root,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_state(root / "mk" / name)


@needs_mergekit
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_qwen2_moe_with_a_shared_expert_matches_mergekit_moe(fam, qwen, family):
    import json

    from transformers import AutoModelForCausalLM

    root = qwen if family == "qwen2" else fam[0]
    name = f"q_{family}"
    shared = "[" + ", ".join(f'"{p}"' for p in SHARED) + "]"
    rc, _, err = _fuse(root, f'moe(base, experts, positive_prompts={_prompts_fuse()}, gate_mode="hidden", '
                             f'router_dtype="bfloat16", shared_expert=base, shared_prompts={shared})', name)
    assert rc == 0, err
    mine = load_state(root / "out" / name)
    ref = _mergekit_qwen(root, name, "hidden")
    worst, where = _worst(mine, ref)
    assert worst <= 1e-5, (worst, where)
    if family == "llama":  # Qwen2-MoE has q/k/v biases; a Llama base has none: zeros, as mergekit-moe
        assert float(mine["model.layers.0.self_attn.q_proj.bias"].abs().max()) == 0.0
    cfg, ref_cfg = (json.loads((d / "config.json").read_text()) for d in (root / "out" / name, root / "mk" / name))
    for k in ("model_type", "num_experts", "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step",
              "shared_expert_intermediate_size", "moe_intermediate_size"):
        assert cfg[k] == ref_cfg[k], k
    model = AutoModelForCausalLM.from_pretrained(root / "out" / name).eval()
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    with torch.no_grad():
        out = model.generate(torch.tensor([[2, 5, 9, 14]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_a_qwen2_base_without_a_shared_expert_says_why(qwen):
    spec = write_spec(qwen, '''model base = local("base")
models experts = [local("e0"), local("e1")]
merge mx = moe(base, experts, gate_mode="random")
save mx to "out/noshared"
''', "noshared.fuse")
    rc, _, err = run_cli("compile", str(spec))
    assert rc == 1 and "'base' is a qwen2 model, and a mixtral MoE is built from llama or mistral models" in err, err
    assert "pass shared_expert=MODEL" in err and "error[E014]" in err


def test_a_moe_is_evaluated_and_runs_from_a_saved_plan(fam):
    """`eval` scores a MoE like any model (an upcycled base has the base's perplexity),
    and a compiled JSON plan with the router stage runs to the same output."""
    import json

    root, _ = fam
    spec = write_spec(root, f'''model base = local("base")
models experts = [local("e0"), local("e1"), local("e2"), local("e3")]
data held_out = dataset("lm.jsonl", text="text")
task ppl = perplexity(held_out, batch_size=5)
merge up = moe(base, [base, base], gate_mode="uniform_random", allow_identical=true)
merge mx = moe(base, experts, positive_prompts={_prompts_fuse()}, experts_per_token=1)
save mx to "out/plan_mx"
eval up, mx, base on ppl to "rep_moe"
''', "evalmoe.fuse")
    rc, _, err = run_cli("run", str(spec))
    assert rc == 0, err
    rows = json.loads((root / "rep_moe" / "report.json").read_text())["rows"]
    base_ppl = rows["base"]["perplexity"]["ppl"]
    assert abs(rows["up"]["perplexity"]["ppl"] - base_ppl) <= 1e-6 * base_ppl
    assert abs(rows["mx"]["perplexity"]["ppl"] - base_ppl) > 2e-5 * base_ppl  # (tiny random models: close to each other)
    first = load_state(root / "out" / "plan_mx")
    plan_spec = write_spec(root, f'''model base = local("base")
models experts = [local("e0"), local("e1"), local("e2"), local("e3")]
merge mx = moe(base, experts, positive_prompts={_prompts_fuse()}, experts_per_token=1)
save mx to "out/plan_mx2"
''', "planmoe.fuse")
    rc, _, err = run_cli("compile", str(plan_spec), "--emit", "json", "-o", str(root / "moe_plan.json"))
    assert rc == 0, err
    rc, _, err = run_cli("run", str(root / "moe_plan.json"), "-q")
    assert rc == 0, err
    second = load_state(root / "out" / "plan_mx2")
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("gate_mode", ["hidden", "hidden_avg"])
def test_router_rows_of_prompts_of_different_lengths_are_each_prompts_own(fam, gate_mode):
    """Padding changes nothing: each router row is computed as if every prompt ran alone
    (independently here: transformers on one prompt at a time, hidden states at each
    layer's input, last token or mean over tokens, averaged over the prompts, normalised)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, f = fam
    prompts = [["the cat sat on the mat", "a dog"], ["red", "big and small then fast"],
               ["under the log", "it ran"], ["slow", "on the mat and the log"]]
    name = f"pad_{gate_mode}"
    rc, _, err = _fuse(root, f'moe(base, experts, positive_prompts={_prompts_fuse(prompts)}, gate_mode="{gate_mode}")',
                       name)
    assert rc == 0, err
    mine = load_state(root / "out" / name)
    model = AutoModelForCausalLM.from_pretrained(f["base"]).eval()
    tok = AutoTokenizer.from_pretrained(f["base"])
    for j, ps in enumerate(prompts):
        vecs = []
        for p in ps:
            ids = tok(tok.bos_token + p, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                hs = model(**ids, output_hidden_states=True).hidden_states[:-1]
            vecs.append(torch.stack([h[0, -1] if gate_mode == "hidden" else h[0].mean(0) for h in hs]))
        v = torch.stack(vecs).mean(0)  # [layers, hidden]
        v = v / v.norm(dim=-1, keepdim=True)
        for layer in range(2):
            got = mine[f"model.layers.{layer}.block_sparse_moe.gate.weight"][j]
            assert torch.allclose(got, v[layer], atol=1e-5), (j, layer, float((got - v[layer]).abs().max()))


def test_the_router_stage_runs_in_its_own_process_and_a_crashed_one_is_replaced(fam, tmp_path, monkeypatch):
    """With an empty stage cache the router stage runs in a separate Python process
    (stages/process.py) while the tensors that need no router are written; when that
    process dies before its result (fault injection), the run says so, computes the
    stage on its own thread and writes the same bytes."""
    root, _ = fam
    merge = f'moe(base, experts, positive_prompts={_prompts_fuse()}, gate_mode="hidden")'
    outputs = {}
    for case, crash in (("proc", ""), ("crashed", "1")):
        monkeypatch.setenv("FUSIONLANG_CACHE", str(tmp_path / case))  # nothing cached: the stage runs
        monkeypatch.setenv("FUSIONLANG_STAGE_PROCESS_CRASH", crash)
        rc, _, err = _fuse(root, merge, f"mx_{case}")
        assert rc == 0, err
        assert "running 1 model stage in a separate process" in err, err
        said = "the model stage process ended without a result (exit code 3): computing the stage here instead"
        assert (said in err) == bool(crash), err
        assert any((tmp_path / case / "stages").glob("*.safetensors"))  # the router's result, cached
        outputs[case] = {f.name: f.read_bytes() for f in (root / "out" / f"mx_{case}").glob("*.safetensors")}
    assert outputs["proc"] and outputs["proc"] == outputs["crashed"]


def test_a_prompt_routed_moe_prestarts_the_stage_process(fam, tmp_path, monkeypatch):
    """`run` parses the spec before compiling and starts the router stage's process at once
    for a `moe` with routers from prompts (inside any expression or definition), not for
    random gates, nor for a spec that does not parse (the compile reports that). The
    prestarted process then computes the stage: the same bytes as a fresh one."""
    from fusionlang.stages import process

    root, _ = fam
    cases = {"hidden": f'merge m = moe(base, experts, positive_prompts={_prompts_fuse()})',
             "in_def": f'def mx(b) = moe(b, experts, positive_prompts={_prompts_fuse()}, gate_mode="cheap_embed")\n'
                       'merge m = mx(base)',
             "random": 'merge m = moe(base, experts, gate_mode="random")',
             "broken": 'merge m = moe(base, experts, positive_prompts=[["a"]]'}
    for name, merge in cases.items():
        spec = write_spec(root, f'model base = local("base")\nmodels experts = [local("e0"), local("e1")]\n{merge}\n',
                          f"pre_{name}.fuse")
        process._WARM.clear()
        process.prestart_for(str(spec))
        assert bool(process._WARM) == (name in ("hidden", "in_def")), name
        for child, _env in process._WARM:
            child.stdin.close()
            assert child.wait(timeout=60) == 0  # an unused prestarted process ends on EOF
    process._WARM.clear()
    monkeypatch.setenv("FUSIONLANG_CACHE", str(tmp_path / "a"))
    process.prestart()
    warm = process._WARM[0][0]
    rc, _, err = _fuse(root, f'moe(base, experts, positive_prompts={_prompts_fuse()})', "mx_warm")
    assert rc == 0, err
    assert not process._WARM and warm.poll() == 0  # used and ended
    monkeypatch.setenv("FUSIONLANG_CACHE", str(tmp_path / "b"))
    rc, _, err = _fuse(root, f'moe(base, experts, positive_prompts={_prompts_fuse()})', "mx_cold")
    assert rc == 0, err
    assert load_state(root / "out" / "mx_warm").keys() == load_state(root / "out" / "mx_cold").keys()
    assert all(torch.equal(a, b) for a, b in zip(load_state(root / "out" / "mx_warm").values(),
                                                  load_state(root / "out" / "mx_cold").values()))
