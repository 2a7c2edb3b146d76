"""merge_adapters(): PEFT LoRA adapters merged in adapter space, against PEFT's own
`add_weighted_adapter` (the reference) on adapters PEFT wrote on a tiny Llama, for every
deterministic combination type; DARE's random pruning by its invariants; located errors."""

from __future__ import annotations

import re

import peft
import pytest
import torch
from conftest import error_locations, load_state, make_family, run_cli, write_spec


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("admerge")
    f = make_family(root, "llama", n_experts=0, seed=8)
    configs = {"a1": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "embed_tokens"]},
               "a2": {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "up_proj", "embed_tokens"]},
               "a3": {"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}}
    for i, (name, cfg) in enumerate(configs.items()):
        torch.manual_seed(20 + i)
        m = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(f["base"]), peft.LoraConfig(**cfg))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn_like(p) * 0.2)
        m.save_pretrained(root / name)
    return root, f


def _peft_merge(root, f, names, weights, **kw) -> dict[str, torch.Tensor]:
    """PEFT's add_weighted_adapter, then its saved adapter's tensors."""
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f["base"]), str(root / names[0]),
                                           adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(root / n), adapter_name=n)
    model.add_weighted_adapter(names, weights, "merged", **kw)
    out = root / "peft_out" / re.sub(r"\W", "_", repr((names, weights, kw)))
    model.save_pretrained(str(out), selected_adapters=["merged"])
    return load_state(out / "merged")


def _fuse(root, names, weights, args: str, out: str) -> dict[str, torch.Tensor]:
    listed = ", ".join(f'"{n}"' for n in names)
    spec = write_spec(root, f'''merge m = merge_adapters([{listed}], weights={weights}{args})
save m to "out/{out}"
''', f"{out}.fuse")
    rc, _, err = run_cli("run", str(spec), "-q")
    assert rc == 0, err
    return load_state(root / "out" / out)


CASES = [
    (["a1", "a2"], [0.7, 0.5], {"combination_type": "linear"}, ', combination_type="linear"'),
    (["a1", "a2"], [1.0, -0.4], {"combination_type": "cat"}, ', combination_type="cat"'),
    (["a1", "a2", "a3"], [1.0, 0.5, 2.0], {"combination_type": "cat"}, ', combination_type="cat"'),
    (["a1", "a2"], [0.6, 0.9], {"combination_type": "ties", "density": 0.5}, ', combination_type="ties", density=0.5'),
    (["a1", "a2"], [0.6, 0.9], {"combination_type": "ties", "density": 0.4, "majority_sign_method": "frequency"},
     ', combination_type="ties", density=0.4, majority_sign_method="frequency"'),
    (["a1", "a2"], [1.0, 0.3], {"combination_type": "magnitude_prune", "density": 0.3},
     ', combination_type="magnitude_prune", density=0.3'),
    (["a1", "a2", "a3"], [1.0, 0.5, 0.8], {"combination_type": "svd"}, ""),
    (["a1", "a2"], [1.0, 0.5], {"combination_type": "svd", "svd_rank": 3, "svd_clamp": 0.9},
     ", svd_rank=3, svd_clamp=0.9"),
    (["a1", "a2"], [1.0, 0.5], {"combination_type": "ties_svd", "density": 0.6, "svd_rank": 6},
     ', combination_type="ties_svd", density=0.6, svd_rank=6'),
    (["a1", "a2"], [1.0, 0.5], {"combination_type": "magnitude_prune_svd", "density": 0.5},
     ', combination_type="magnitude_prune_svd", density=0.5'),
]


@pytest.mark.parametrize("names,weights,kw,args", CASES, ids=[f"{c[2]['combination_type']}{i}" for i, c in enumerate(CASES)])
def test_merge_adapters_matches_peft_add_weighted_adapter(fam, names, weights, kw, args):
    root, f = fam
    want = _peft_merge(root, f, names, weights, **kw)
    got = _fuse(root, names, weights, args, f"m{abs(hash(args + str(names))) % 10**6}")
    # PEFT also saves the (unchanged) embedding layer the adapters target: not a factor
    want = {k: v for k, v in want.items() if ".base_layer." not in k}
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:6]
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst < 1e-5, worst


def test_dare_keeps_density_and_rescales(fam):
    """DARE draws its own seeded masks (PEFT draws from torch's global generator): density
    1 equals linear; the same seed gives the same adapter; about `density` of each
    factor's entries survive, rescaled by 1/density."""
    root, _ = fam
    lin = _fuse(root, ["a1", "a2"], [1.0, 0.5], ', combination_type="linear"', "dlin")
    full = _fuse(root, ["a1", "a2"], [1.0, 0.5], ', combination_type="dare_linear", density=1.0', "dfull")
    assert all(torch.equal(lin[k], full[k]) for k in lin)
    # (one adapter merges linearly, as in PEFT: a2 at weight 0 leaves a1's dropped factors)
    one = _fuse(root, ["a1", "a2"], [1.0, 0.0], ', combination_type="dare_linear", density=0.5, seed=3', "done")
    again = _fuse(root, ["a1", "a2"], [1.0, 0.0], ', combination_type="dare_linear", density=0.5, seed=3', "dagain")
    assert all(torch.equal(one[k], again[k]) for k in one)
    src = load_state(root / "a1")
    key = next(k for k in src if k.endswith("q_proj.lora_A.weight"))
    scale = (8 / 4) ** 0.5  # sqrt(weight * lora_alpha / r)
    kept = one[key] != 0
    assert 0.35 < float(kept.float().mean()) < 0.65
    assert torch.allclose(one[key][kept], src[key][kept] * scale / 0.5, atol=1e-6)


@pytest.mark.parametrize("merge,code,words", [
    ('merge_adapters(["a1", "a3"], weights=[1, 1], combination_type="linear")', "E006", "r = 4, 2"),
    ('merge_adapters(["a1", "a2"], weights=[1])', "E006", "one number per adapter"),
    ('merge_adapters(["a1", "a2"], weights=[1, 1], combination_type="mean")', "E006", "is not one of"),
    ('merge_adapters(["a1", "nope"], weights=[1, 1])', "E010", "does not exist"),
])
def test_merge_adapters_mistakes_are_located(fam, merge, code, words):
    root, _ = fam
    spec = write_spec(root, f"merge bad = {merge}\nsave bad to \"out/bad\"\n", "bad.fuse")
    rc, _, err = run_cli("compile", str(spec))
    assert rc == 1 and words in err and "Traceback" not in err, err
    assert error_locations(err)[0][0] == 1 and error_locations(err)[0][2] == code, err
