"""BitDelta (issue 11 §3) against FusionBench 0.2.33's `BitDeltaAlgorithm`
(tests/reference/fusionbench_bitdelta.py: its compression, training loop, save_diff and
load_diff on the same rows) on a tiny Llama base and fine-tune; plus what needs no
reference: the compressed deltas are one sign and one scale per matrix, calibration
lowers the logit error below the uncalibrated compression's, calibrate="scales" trains
nothing else, and the located errors."""

from __future__ import annotations

import json
import random

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

STEPS, BS, LR, MAXLEN = 12, 2, 1e-3, 12


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A tiny Llama (hidden 32, MLP 64: in-features divisible by 32, as FusionBench's bit
    packing needs) and a fine-tune (every tensor moved by noise), 24 rows of text."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("bitdelta")
    base = word_llama(root / "base", 9, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    g = torch.Generator().manual_seed(10)
    ft = LlamaForCausalLM(base.config)
    ft.load_state_dict({k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()})
    ft.save_pretrained(root / "ft")
    word_tokenizer()[0].save_pretrained(root / "ft")
    rng = random.Random(3)
    rows = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(STEPS * BS)]
    (root / "calib.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return root, rows


def ours(root, name: str, args: str = "", lr: float = LR, steps: int = STEPS) -> dict[str, torch.Tensor]:
    spec = write_spec(root, f'''use merging
model base = local("base")
model ft = local("ft")
data calib = dataset("calib.jsonl", text="text")
merge {name} = bitdelta(base, ft, calib, lr={lr}, batch_size={BS}, num_steps={steps}, max_length={MAXLEN}{args})
save {name} to "out/{name}"
''', f"{name}.fuse")
    rc, _, err = run_cli("run", str(spec), "-q")
    assert rc == 0, err
    return load_state(root / "out" / name)


def compressed(k: str) -> bool:
    return k.startswith("model.layers.") and k.endswith("proj.weight")


@needs_fusionbench
def test_matches_fusionbench(fam):
    root, rows = fam
    mine = ours(root, "bd")
    cfg = {"base": str(root / "base"), "model": str(root / "ft"), "texts": rows, "work": str(root),
           "params": {"lr": LR, "batch_size": BS, "num_steps": STEPS, "max_length": MAXLEN},
           "out": str(root / "fb_bd.safetensors")}
    (root / "fb_bd.json").write_text(json.dumps(cfg))
    run_reference(FUSIONBENCH_PYTHON, REPO / "tests/reference/fusionbench_bitdelta.py", root / "fb_bd.json")
    from safetensors.torch import load_file

    ref = load_file(str(root / "fb_bd.safetensors"))
    ft = load_state(root / "ft")
    assert set(mine) == set(ref)
    moved = 0
    for k in ref:
        scale = 1 + float(ref[k].abs().max())
        assert float((mine[k] - ref[k]).abs().max()) <= 2e-5 * scale, (k, float((mine[k] - ref[k]).abs().max()))
        moved += not compressed(k) and not torch.equal(ref[k], ft[k])
    assert moved > 0  # FusionBench trains the other parameters too (calibrate="all")


def test_deltas_are_one_sign_and_one_scale(fam):
    root, _ = fam
    mine = ours(root, "bd_scales", ', calibrate="scales"')
    base, ft = load_state(root / "base"), load_state(root / "ft")
    for k, v in mine.items():
        if not compressed(k):
            assert torch.equal(v, ft[k]), k  # calibrate="scales" trains nothing else
            continue
        delta = ft[k] - base[k]
        got = v - base[k]
        s = got.abs().mean()
        # one magnitude per matrix, the fine-tune's signs (+ where the delta is >= 0)
        assert torch.allclose(got.abs(), s.expand_as(got), atol=1e-6), k
        assert torch.equal(got > 0, delta >= 0), k
        assert abs(float(s) - float(delta.abs().mean())) > 1e-7  # calibrated, not the initial mean |delta|


def test_calibration_lowers_the_logit_error(fam):
    """The MSE between the fine-tune's logits and the compressed model's on the rows,
    measured by an independent forward pass (48 steps: the rows twice)."""
    root, rows = fam
    from transformers import AutoModelForCausalLM

    mine = ours(root, "bd_long", ', calibrate="scales"', lr=0.01, steps=48)
    base, ft = load_state(root / "base"), load_state(root / "ft")
    init = {k: (base[k] + (v - base[k]).abs().mean() * torch.where(v - base[k] >= 0, 1.0, -1.0))
            if compressed(k) else v for k, v in ft.items()}
    model = AutoModelForCausalLM.from_pretrained(root / "ft", dtype=torch.float32).eval()
    fast, _ = word_tokenizer()
    batch = fast(rows, padding="max_length", max_length=MAXLEN, truncation=True, return_tensors="pt")

    def logits(state):
        model.load_state_dict(state, strict=False)
        with torch.no_grad():
            return model(**batch).logits

    target = logits(ft)

    def err(state):
        return float(torch.nn.functional.mse_loss(logits(state), target))

    def scaled(k):  # every calibrated scale times k
        return {n: base[n] + k * (v - base[n]) if compressed(n) else v for n, v in mine.items()}

    # better than the initial scales (mean |delta|, the weight-space optimum), and a
    # local optimum of the logit error: scaling every scale up or down makes it worse
    assert err(mine) < err(init), (err(mine), err(init))
    assert err(mine) < min(err(scaled(1.1)), err(scaled(0.9)))


@pytest.mark.parametrize("args,needle", [
    (', calibrate="some"', "calibrate"),
    (", num_steps=-1", "num_steps"),
    (", lr=0", "lr"),
])
def test_bad_arguments_are_located(fam, args, needle):
    root, _ = fam
    spec = write_spec(root, f'''use merging
model base = local("base")
model ft = local("ft")
data calib = dataset("calib.jsonl", text="text")
merge bad = bitdelta(base, ft, calib{args})
save bad to "out/bad"
''', "bad.fuse")
    d = expect_error(run_cli("compile", str(spec)), "E006", line=5)
    assert needle in d["msg"] and d["col"] > len("merge bad = bitdelta(base, ft, calib"), d
