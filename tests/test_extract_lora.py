"""extract_lora(): a PEFT LoRA adapter from a fine-tune, against `mergekit-extract-lora`
0.1.5 (its own venv) on tiny Llama models, tensor for tensor; loaded by PEFT, a
full-rank adapter reproduces the fine-tune's logits (an independent invariant); located
errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import error_locations, load_state, make_family, run_cli, write_spec
from test_mergekit_conformance import MERGEKIT

# mergekit-extract-lora sits next to mergekit-yaml (required on CI by that module)
MK = str(Path(MERGEKIT).parent / "mergekit-extract-lora") if MERGEKIT else None
needs_mergekit = pytest.mark.skipif(MK is None, reason="mergekit not installed (bash .ci/install_mergekit.sh)")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    # q/k/v/o biases: lora_B.bias; noise 0.05: task vectors of full rank
    return root, make_family(root, "llama", n_experts=1, noise=0.05, seed=4, attention_bias=True)


def _fuse(root: Path, name: str, args: str = "") -> Path:
    spec = write_spec(root, f'''model base = local("base")
model ft = local("e0")
merge {name} = extract_lora(base, ft{args})
save {name} to "out/{name}"
''', f"{name}.fuse")
    rc, _, err = run_cli("run", str(spec), "-q")
    assert rc == 0, err
    return root / "out" / name


def _mk(root: Path, name: str, flags: list[str]) -> Path:
    out = root / "mk" / name
    r = subprocess.run([MK, "--model", "./e0", "--base-model", "./base", "--out-path", str(out), *flags], cwd=root,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _ba(state: dict, module: str) -> torch.Tensor:
    return state[f"{module}.lora_B.weight"].double() @ state[f"{module}.lora_A.weight"].double()


@needs_mergekit
@pytest.mark.parametrize("args,flags", [
    (", max_rank=4", ["--max-rank", "4"]),
    # (PEFT cannot load LoRA biases next to LoRA embeddings: the biased layers are excluded)
    (', max_rank=3, distribute_scale=false, embed_lora=true, exclude=["self_attn"]',
     ["--max-rank", "3", "--no-distribute-scale", "--embed-lora", "-e", "self_attn"]),
    # (MergeKit crashes when --save-module is given and it must add a module itself: here
    # every module it would add is named or skipped)
    ((', max_rank=2, include=["mlp", "self_attn\\\\.q"], exclude=["down_proj"], '
     'modules_to_save=["embed_tokens", "lm_head"], skip_undecomposable=true'),
     ["--max-rank", "2", "-i", "mlp", "-i", r"self_attn\.q", "-e", "down_proj", "--save-module", "embed_tokens",
      "--save-module", "lm_head", "--skip-undecomposable"]),
])
def test_adapter_matches_mergekit_extract_lora(fam, args, flags):
    root, _ = fam
    name = f"lx{abs(hash(args)) % 10**6}"
    mine, ref = _fuse(root, name, args), _mk(root, name, flags)
    a, b = load_state(mine), load_state(ref)
    # MergeKit's Llama architecture table lists no attention biases, so it drops their
    # change (the fine-tune's q/k/v/o biases): here they are lora_B.bias (PEFT's lora_bias)
    assert set(b) <= set(a), sorted(set(b) - set(a))[:6]
    assert all(k.endswith("self_attn.q_proj.lora_B.bias") or re.search(r"self_attn\.[kvo]_proj\.lora_B\.bias$", k)
               for k in set(a) - set(b)), sorted(set(a) - set(b))[:6]
    # the factors of nearly equal singular values are defined only up to a rotation, which
    # float32 SVDs choose differently with the thread count: compare B·A, and whole tensors.
    # At rank 3 of a noise task vector (close singular values at the cut) B·A itself moved
    # by 2.8e-5 of its largest entry between thread counts; a wrong extraction moves it by ~1.
    def product(st, k):
        if ".lora_A." in k or k.endswith("lora_embedding_A"):
            kb = k.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
            return st[kb].double() @ st[k].double()
        return st[k].double()

    keys = [k for k in b if ".lora_B." not in k or k.endswith(".bias")]
    keys = [k for k in keys if not k.endswith("lora_embedding_B")]
    worst = max(float((product(a, k) - product(b, k)).abs().max()) / max(float(product(b, k).abs().max()), 1e-12)
                for k in keys)
    assert worst < 2e-4, worst
    assert all(a[k].shape == b[k].shape for k in b)
    ca, cb = (json.loads((d / "adapter_config.json").read_text()) for d in (mine, ref))
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "modules_to_save", "task_type", "peft_type"):
        assert ca[key] == cb[key], key
    assert sorted(ca["target_modules"]) == sorted(cb["target_modules"])
    assert ca["lora_bias"] == any(k.endswith("lora_B.bias") for k in a) == (set(a) != set(b))


@needs_mergekit
def test_sv_epsilon_keeps_the_rank_with_zero_directions(fam):
    """MergeKit drops the singular values ≤ epsilon (smaller tensors); here they are zero
    rows / columns at the same rank: the same B·A for every module."""
    root, f = fam
    st_b, st_f = load_state(f["base"]), load_state(f["e0"])
    key = "model.layers.0.mlp.up_proj.weight"
    sv = torch.linalg.svdvals((st_f[key] - st_b[key]).double())
    # cuts this module to rank 5: halfway between two singular values, so that rounding
    # (float32 LAPACK in MergeKit, the float64 Gram matrix here) cannot decide a tie
    eps = float(sv[4] + sv[5]) / 2
    a = load_state(_fuse(root, "eps", f", max_rank=8, sv_epsilon={eps}"))
    b = load_state(_mk(root, "eps", ["--max-rank", "8", "--sv-epsilon", str(eps)]))
    assert set(b) <= set(a)
    modules = {k.rsplit(".lora_", 1)[0] for k in a if ".lora_A." in k}
    smaller = 0
    for m in modules:
        # the truth: the float64 SVD truncated to the singular values above eps (≤ 8)
        w = m.removeprefix("base_model.model.") + ".weight"
        u, s, vh = torch.linalg.svd(st_f[w].double() - st_b[w].double(), full_matrices=False)
        s = torch.where(s[:8] > eps, s[:8], torch.zeros_like(s[:8]))
        truth = (u[:, :8] * s) @ vh[:8]
        scale = float(truth.abs().max())
        assert float((_ba(a, m) - truth).abs().max()) <= 1e-6 * scale, m
        assert float((_ba(b, m) - truth).abs().max()) <= 1e-4 * scale, m  # MergeKit's float32 SVD
        smaller += b[f"{m}.lora_A.weight"].shape[0] < a[f"{m}.lora_A.weight"].shape[0]
    assert smaller > 0  # the threshold did cut some module's rank


def test_full_rank_adapter_in_peft_is_the_fine_tune(fam):
    """Independent of MergeKit: at full rank B·A is the whole task vector and the other
    modules are saved whole, so PEFT's model on the base computes the fine-tune."""
    import peft  # the test extra installs it
    from transformers import AutoModelForCausalLM

    root, f = fam
    out = _fuse(root, "full", ", max_rank=64")
    config = json.loads((out / "adapter_config.json").read_text())
    hidden = json.loads((f["base"] / "config.json").read_text())["hidden_size"]
    assert config["r"] == hidden and config["lora_bias"] is True  # min(out, in) of every Linear: full rank
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f["base"]), str(out)).eval()
    ft = AutoModelForCausalLM.from_pretrained(f["e0"]).eval()
    base = AutoModelForCausalLM.from_pretrained(f["base"]).eval()
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        got, want, far = model(ids).logits, ft(ids).logits, base(ids).logits
    assert float((got - want).abs().max()) < 1e-4
    assert float((far - want).abs().max()) > 1e-2
    # a low-rank adapter is the best rank-r approximation of each task vector
    low = load_state(_fuse(root, "low", ", max_rank=2"))
    st_b, st_f = load_state(f["base"]), load_state(f["e0"])
    delta = (st_f["model.layers.0.mlp.up_proj.weight"] - st_b["model.layers.0.mlp.up_proj.weight"]).double()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    assert float((_ba(low, "base_model.model.model.layers.0.mlp.up_proj") - best).abs().max()) < 1e-5


@pytest.mark.parametrize("merge,code,words", [
    ("extract_lora(base, ft, max_rank=0)", "E006", "max_rank=0 must be a whole number of at least 1"),
    ('extract_lora(base, ft, include=["nothing_here"])', "E008", "no module of 'ft' is left"),
    ('extract_lora(base, ft, exclude=["(unclosed"])', "E006", "is not a regular expression"),
    ("extract_lora(base, ft) + base", "E005", "must be the whole value of a merge"),
    ("extract_lora(base, ft, embed_lora=true)", "E006", "PEFT cannot load an adapter with both LoRA biases"),
    ('extract_lora(local("wide"), ft)', "E009", "in 'ft' but"),
])
def test_extract_lora_mistakes_are_located(fam, merge, code, words):
    root, _ = fam
    if "wide" in merge and not (root / "wide").exists():
        make_family(root / "widefam", "llama", n_experts=0, intermediate_size=48)
        (root / "wide").symlink_to(root / "widefam" / "base")
    spec = write_spec(root, f'''model base = local("base")
model ft = local("e0")
merge bad = {merge}
save bad to "out/bad"
''', "bad.fuse")
    rc, _, err = run_cli("compile", str(spec))
    assert rc == 1 and words in err and "Traceback" not in err, err
    assert error_locations(err)[0][:1] == (3,) and error_locations(err)[0][2] == code, err


def test_an_adapter_is_not_evaluated_or_loaded_as_a_model(fam):
    root, _ = fam
    (root / "lm.jsonl").write_text('{"text": "a b c"}\n')
    spec = write_spec(root, '''model base = local("base")
model ft = local("e0")
merge ad = extract_lora(base, ft, max_rank=2)
task ppl = perplexity(dataset("lm.jsonl", text="text"))
save ad to "out/ad_eval"
eval ad on ppl
''', "ad_eval.fuse")
    rc, _, err = run_cli("run", str(spec))
    assert rc == 1 and error_locations(err) == [(6, 1, "E014")] and "is a LoRA adapter (extract_lora)" in err, err
    assert not (root / "out" / "ad_eval").exists()
    import fusionlang
    from fusionlang.lang.diagnostics import FuseErrors

    out = _fuse(root, "ad_load", ", max_rank=2")
    with pytest.raises(FuseErrors, match="is a PEFT adapter"):
        fusionlang.load(out)
