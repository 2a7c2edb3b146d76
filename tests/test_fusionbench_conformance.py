"""fusionlang's data-dependent methods vs FusionBench 0.2.33 itself (installed by
.ci/install_fusionbench.sh into its own venv), on tiny BERT sequence classifiers and
the same JSON lines data: RegMean (`regmean_merging`) and Fisher merging
(`fisher_merging`), FusionBench's functions run on the same batches. Skips when
FusionBench is absent, except on CI."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_state, make_classifier_family, run_cli, run_reference, write_spec

FB_PYTHON = Path(os.environ.get("FUSIONBENCH_PYTHON") or REPO / ".venv-fusionbench/bin/python")
HAVE_FB = FB_PYTHON.is_file() and subprocess.run([str(FB_PYTHON), "-c", "import fusion_bench"],
                                                 capture_output=True, check=False).returncode == 0
if not HAVE_FB and os.environ.get("CI"):
    raise RuntimeError("FusionBench is required on CI: run `bash .ci/install_fusionbench.sh`")
pytestmark = pytest.mark.skipif(not HAVE_FB, reason="fusion-bench not installed (bash .ci/install_fusionbench.sh)")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fbdata")
    # NOTE: no dropout: FusionBench's AdaMerging puts the model in train mode (CLIP has no
    # dropout); fusionlang's stages run in eval mode
    return root, make_classifier_family(root, n_experts=3, rows=80, dropout=0.0)


def reference(root: Path, fam: dict, method: str, n: int, batch_size: int, **kw) -> dict[str, torch.Tensor]:
    out = root / f"ref_{method}_{n}_{batch_size}.safetensors"
    cfg = {"method": method, "models": [str(fam[f"e{k}"]) for k in range(3)],
           "data": [str(fam[f"data{k}"]) for k in range(3)], "n": n, "batch_size": batch_size,
           "out": str(out), **kw}
    (root / "ref.json").write_text(json.dumps(cfg))
    run_reference(FB_PYTHON, REPO / "tests/reference/fusionbench_data_methods.py", root / "ref.json")
    from safetensors.torch import load_file

    return load_file(str(out))


def ours(root: Path, merge: str, name: str, n: int) -> dict[str, torch.Tensor]:
    spec = write_spec(root, f'''use merging
model base = local("base")
models experts = [local("e0"), local("e1"), local("e2")]
data d0 = dataset("data0.jsonl", text="text", n={n})
data d1 = dataset("data1.jsonl", text="text", n={n})
data d2 = dataset("data2.jsonl", text="text", n={n})
merge {name} = {merge}
save {name} to "out/{name}"
''', f"{name}.fuse")
    rc, _, err = run_cli("run", str(spec), "-q")
    assert rc == 0, err
    return load_state(root / "out" / name)


def assert_same(mine: dict, ref: dict, tol: float) -> None:
    assert set(ref) <= set(mine)
    worst = max((float((mine[k].float() - ref[k].float()).abs().max()) / (1.0 + float(ref[k].abs().max())), k)
                for k in ref)
    assert worst[0] <= tol, worst


# NOTE: alpha=1 (no regularisation) solves with the raw Gram sums, whose condition number
# (the pooler's: 40 rows of [CLS] states) amplifies FusionBench's float32 running means to
# ~4e-5; fusionlang sums in float32 but solves in float64. Hence the looser bound there.
@pytest.mark.parametrize("n,batch_size,alpha,tol", [(64, 32, 0.95, 1e-5), (48, 16, 0.5, 1e-5), (40, 8, 0.8, 1e-5),
                                                    (40, 8, 1.0, 1e-4)])
def test_regmean_matches_fusionbench(fam, n, batch_size, alpha, tol):
    root, f = fam
    ref = reference(root, f, "regmean", n, batch_size, alpha=alpha)
    # FusionBench counts padded positions as rows of its Gram matrices (include_padding)
    mine = ours(root, f"regmean(experts, [d0, d1, d2], alpha={alpha}, batch_size={batch_size}, include_padding=true)",
                f"rm_{n}_{int(alpha * 100)}", n)
    # the Linear weights really differ from the plain average (RegMean did something)
    w = "bert.encoder.layer.0.intermediate.dense.weight"
    avg = sum(load_state(f[f"e{k}"])[w] for k in range(3)) / 3
    assert float((mine[w] - avg).abs().max()) > 1e-3
    assert_same(mine, ref, tol)


@pytest.mark.parametrize("n,batch_size,normalize", [(64, 32, True), (48, 16, False)])
def test_fisher_matches_fusionbench(fam, n, batch_size, normalize):
    root, f = fam
    ref = reference(root, f, "fisher", n, batch_size, normalize=normalize)
    # the reference batches the rows in the data's order (batch_order="given")
    mine = ours(root, f"fisher_merging(experts, [d0, d1, d2], batch_size={batch_size}, batch_order=\"given\", "
                f"normalize_fisher_weight={'true' if normalize else 'false'})", f"fm_{n}", n)
    w = "bert.encoder.layer.1.output.dense.weight"
    avg = sum(load_state(f[f"e{k}"])[w] for k in range(3)) / 3
    assert float((mine[w] - avg).abs().max()) > 1e-4
    assert_same(mine, ref, 1e-5)


@pytest.mark.parametrize("mode,steps,batch_size", [("task", 6, 16), ("layer", 4, 8)])
def test_adamerging_matches_fusionbench(fam, mode, steps, batch_size):
    root, f = fam
    n = 40
    ref = reference(root, f, "adamerging", n, batch_size, base=str(f["base"]), mode=mode, steps=steps, lr=0.01,
                    init=0.3, seed=7)
    mine = ours(root, f'adamerging(base, experts, [d0, d1, d2], mode="{mode}", steps={steps}, lr=0.01, '
                f"batch_size={batch_size}, seed=7)", f"am_{mode}", n)
    # the coefficients moved away from their initial value (the test would catch a no-op)
    base = load_state(f["base"])
    w = "bert.encoder.layer.0.output.dense.weight"
    ta = base[w] + 0.3 * sum(load_state(f[f"e{k}"])[w] - base[w] for k in range(3))
    assert float((mine[w] - ta).abs().max()) > 1e-5
    assert_same(mine, ref, 1e-5)


@pytest.mark.parametrize("members,kw,fb", [
    ("experts", "", {"mode": "mean"}),
    ("[e0, e2]", ", weights=[0.7, 0.2]", {"mode": "mean", "weights": [0.7, 0.2]}),
    ("[e0, e2]", ", weights=[2, -1], normalize=false", {"mode": "mean", "weights": [2.0, -1.0], "normalize": False}),
    ("experts", ', mode="max"', {"mode": "max"}),
])
def test_ensembles_match_fusionbench(fam, members, kw, fb):
    import fusionlang

    root, f = fam
    name = f"ens{abs(hash((members, kw))) % 10**6}"
    spec = write_spec(root, f'''use merging
model e0 = local("e0")
model e2 = local("e2")
models experts = [local("e0"), local("e1"), local("e2")]
ensemble {name} = ensemble({members}{kw})
task t = accuracy(dataset("data1.jsonl", text="text", label="label", n=40))
save {name} to "out/{name}"
eval {name} on t to "rep_{name}"
''', f"{name}.fuse")
    rc, _, err = run_cli("run", str(spec))
    assert rc == 0, err
    models = [str(f[k]) for k in (("e0", "e1", "e2") if members == "experts" else ("e0", "e2"))]
    out = root / f"ref_{name}.safetensors"
    (root / "ens.json").write_text(json.dumps({"method": "ensemble", "models": models, "data": [str(f["data1"])],
                                               "n": 40, "out": str(out), **fb}))
    run_reference(FB_PYTHON, REPO / "tests/reference/fusionbench_data_methods.py", root / "ens.json")
    from safetensors.torch import load_file

    ref = load_file(str(out))
    ens = fusionlang.load(root / "out" / name)
    with torch.no_grad():
        mine = ens(**{k: v for k, v in ref.items() if k != "logits"})
    assert torch.allclose(mine, ref["logits"], atol=1e-5)
    # eval scored the ensemble with the same combined logits
    labels = torch.tensor([json.loads(x)["label"] for x in (root / "data1.jsonl").read_text().splitlines()][:40])
    report = json.loads((root / f"rep_{name}" / "report.json").read_text())
    assert report["rows"][name]["accuracy"]["t"] == pytest.approx(float((ref["logits"].argmax(-1) == labels).float().mean()))


@pytest.mark.parametrize("alpha,batch_size", [(0.95, 16), (0.6, 8)])
def test_regmean_plusplus_matches_fusionbench(fam, alpha, batch_size):
    root, f = fam
    import random

    from conftest import WORDS

    # rows of 8 words: one token each, so no row needs padding (FusionBench's layers run
    # without an attention mask)
    rng = random.Random(2)
    for k in range(3):
        (root / f"even{k}.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(8))})
                                                     + "\n" for _ in range(32)))
    fam_even = {**f, **{f"data{k}": root / f"even{k}.jsonl" for k in range(3)}}
    ref = reference(root, fam_even, "regmean_plusplus", 32, batch_size, alpha=alpha, base=str(f["base"]))
    spec = write_spec(root, f'''use merging
model base = local("base")
models experts = [local("e0"), local("e1"), local("e2")]
let d = [dataset("even0.jsonl", text="text"), dataset("even1.jsonl", text="text"), dataset("even2.jsonl", text="text")]
merge rpp = regmean_plusplus(experts, d, alpha={alpha}, batch_size={batch_size}) {{
    "*pooler*" => base
    "classifier.*" => base
}}
save rpp to "out/rpp_{batch_size}"
''', f"rpp_{batch_size}.fuse")
    rc, _, err = run_cli("run", str(spec), "-q")
    assert rc == 0, err
    mine = load_state(root / "out" / f"rpp_{batch_size}")
    # RegMean++ differs from RegMean above the first layer (its inputs come from merged layers)
    spec2 = write_spec(root, spec.read_text().replace("regmean_plusplus(", "regmean(").replace(
        f"rpp_{batch_size}\"", f"rm_cmp_{batch_size}\""), f"rm_cmp_{batch_size}.fuse")
    rc, _, err = run_cli("run", str(spec2), "-q")
    assert rc == 0, err
    plain = load_state(root / "out" / f"rm_cmp_{batch_size}")
    w = "bert.encoder.layer.1.attention.self.query.weight"
    assert float((mine[w] - plain[w]).abs().max()) > 1e-4
    assert_same(mine, ref, 1e-5)
