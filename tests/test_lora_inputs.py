"""lora(base, "adapter_dir"): PEFT LoRA adapters as inputs, merged into the base tensor by
tensor; against PEFT's own `merge_and_unload` (the reference implementation) for
adapters PEFT wrote, with rank / alpha patterns, rsLoRA, embeddings, biases and
modules_to_save; adapters inside a merge; located errors."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import error_locations, load_state, make_family, run_cli, write_spec


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("lorain")
    return root, make_family(root, "llama", n_experts=0, seed=6, attention_bias=True)


def _adapter(root, name: str, seed: int, **cfg) -> object:
    """A PEFT adapter on the base, its B (and A) drawn at random (PEFT starts B at 0),
    saved by PEFT; returns the PEFT model (for the reference merge)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"), peft.LoraConfig(**cfg))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(root / name)
    return model


def _reference(model) -> dict[str, torch.Tensor]:
    merged = model.merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


CASES = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
    "patterns": {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "gate_proj"], "use_rslora": True,
                     "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"gate_proj": 3}},
    "embed": {"r": 3, "lora_alpha": 3, "target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
    "bias": {"r": 2, "lora_alpha": 5, "target_modules": ["q_proj", "o_proj"], "lora_bias": True},
}


@pytest.mark.parametrize("case", list(CASES))
def test_lora_input_equals_peft_merge_and_unload(fam, case):
    root, _ = fam
    ref = _reference(_adapter(root, f"ad_{case}", seed=len(case), **CASES[case]))
    spec = write_spec(root, f'''model base = local("base")
model tuned = lora(base, "ad_{case}")
save tuned to "out/{case}"
''', f"{case}.fuse")
    rc, _, err = run_cli("run", str(spec), "-q")
    assert rc == 0, err
    mine = load_state(root / "out" / case)
    base = load_state(root / "base")
    assert set(mine) == set(base)
    for k, v in mine.items():
        assert float((v.double() - ref[k].double()).abs().max()) < 1e-6, k
    changed = {k for k in base if not torch.equal(mine[k], base[k])}
    assert changed and changed == {k for k in base if not torch.equal(ref[k], base[k])}


def test_adapters_inside_a_merge_are_the_merged_models(fam, tmp_path):
    """ties over lora() inputs equals ties over the models PEFT merged and saved."""
    root, _ = fam
    for case in ("plain", "patterns"):
        model = _adapter(root, f"in_{case}", seed=len(case) + 7, **CASES[case])
        model.merge_and_unload().save_pretrained(root / f"dense_{case}")
    spec = write_spec(root, '''use merging
model base = local("base")
merge a = ties(base, [lora(base, "in_plain"), lora(base, "in_patterns")], density=0.5)
merge b = ties(base, [local("dense_plain"), local("dense_patterns")], density=0.5)
save a to "out/ties_a"
save b to "out/ties_b"
''', "in_merge.fuse")
    rc, _, err = run_cli("run", str(spec), "-q")
    assert rc == 0, err
    a, b = load_state(root / "out" / "ties_a"), load_state(root / "out" / "ties_b")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_bad_adapters_are_located(fam):
    root, _ = fam
    _adapter(root, "ad_dora", seed=3, r=2, lora_alpha=2, target_modules=["q_proj"], use_dora=True)
    wide = make_family(root / "widefam", "llama", n_experts=0, seed=1, intermediate_size=48)
    from transformers import AutoModelForCausalLM

    m = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(wide["base"]),
                            peft.LoraConfig(r=2, target_modules=["up_proj"]))
    m.save_pretrained(root / "ad_wide")
    (root / "not_adapter").mkdir(exist_ok=True)
    for name, code, words in [("nowhere", "E010", "does not exist"), ("not_adapter", "E010", "not a PEFT adapter"),
                              ("ad_dora", "E014", "DoRA"), ("ad_wide", "E009", "do not fit tensor")]:
        spec = write_spec(root, f'''model base = local("base")
model t = lora(base, "{name}")
save t to "out/bad_{name}"
''', "bad.fuse")
        rc, _, err = run_cli("compile", str(spec))
        assert rc == 1 and words in err and "Traceback" not in err, err
        line, col, got = error_locations(err)[0]
        assert (line, got) == (2, code) and col in (11, 22), err
