"""fusionlang's FusionBench data-free methods (issue 11) vs FusionBench 0.2.33 itself
(its venv, .ci/install_fusionbench.sh) on tiny Llama models: TSV-M, Iso-C, Iso-CTS,
MagMax, EMR-merging, OPCM, magnitude-difference pruning and the Llama magnitude pruning
(per row, n:m),
each FusionBench class or function run by tests/reference/fusionbench_data_free.py on
the same model directories. TALL masks and consensus merging are tested against an
independent computation from the paper's formulas (FusionBench 0.2.33's
`TallMaskTaskArithmeticAlgorithm` raises, and tests/test_fusionbench_methods.py shows
it). Plus the compile-time errors of their parameters. Skips the FusionBench runs when
it is absent, except on CI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_state, make_family, run_cli, run_reference, write_spec

FB_PYTHON = Path(os.environ.get("FUSIONBENCH_PYTHON") or REPO / ".venv-fusionbench/bin/python")
HAVE_FB = FB_PYTHON.is_file()
if not HAVE_FB and os.environ.get("CI"):
    raise RuntimeError("FusionBench is required on CI: run `bash .ci/install_fusionbench.sh`")
needs_fb = pytest.mark.skipif(not HAVE_FB, reason="fusion-bench not installed (bash .ci/install_fusionbench.sh)")


@pytest.fixture(scope="module")
def fams(tmp_path_factory):
    """Tiny Llamas (hidden 32, k/v 16, MLP 64, vocab 96): 3 experts (32 = 3·10 + 2: TSV-M
    leaves 2 directions unused) and 2 experts (ranks divide evenly). In the tie family
    the q projections are exact: base 0, e1 = −e0, e2 = e0 / 2, so |τ_0| = |τ_1| with
    opposite signs everywhere (MagMax's tie rule decides)."""
    root = tmp_path_factory.mktemp("fbmethods")
    three = make_family(root / "three", "llama", n_experts=3, seed=3)
    two = make_family(root / "two", "llama", n_experts=2, seed=5)
    tie = make_family(root / "tie", "llama", n_experts=3, seed=7)
    from safetensors.torch import save_file

    states = {name: load_state(tie[name]) for name in ("base", "e0", "e1", "e2")}
    for k in states["base"]:
        if "q_proj" in k:
            e0 = states["e0"][k]
            states["base"][k], states["e1"][k], states["e2"][k] = torch.zeros_like(e0), -e0, e0 / 2
    for name, sd in states.items():
        save_file(sd, str(next(Path(tie[name]).glob("*.safetensors"))), metadata={"format": "pt"})
    # dup: e1 equals e0 on the q projections (equal task vectors: the whitening of TSV-M
    # and Iso-CTS is not unique there; FusionBench's own matrices decide it)
    dup = make_family(root / "dup", "llama", n_experts=3, seed=11)
    e0, e1 = load_state(dup["e0"]), load_state(dup["e1"])
    e1.update({k: v.clone() for k, v in e0.items() if "q_proj" in k})
    save_file(e1, str(next(Path(dup["e1"]).glob("*.safetensors"))), metadata={"format": "pt"})
    return {"three": three, "two": two, "tie": tie, "dup": dup}


def fusionbench(root: Path, method: str, fam: dict, n_models: int, **params) -> dict[str, torch.Tensor]:
    out = root / f"fb_{method}_{abs(hash(json.dumps(params, sort_keys=True))) % 10**8}.safetensors"
    cfg = {"method": method, "base": str(fam["base"]), "models": [str(fam[f"e{i}"]) for i in range(n_models)],
           "out": str(out), "params": params}
    (root / "fb.json").write_text(json.dumps(cfg))
    run_reference(FB_PYTHON, REPO / "tests/reference/fusionbench_data_free.py", root / "fb.json")
    from safetensors.torch import load_file

    return load_file(str(out))


def ours(fam: dict, n: int, merge: str, rules: str = "") -> dict[str, torch.Tensor]:
    root = Path(fam["base"]).parent
    name = f"m{abs(hash((merge, rules))) % 10**8}"
    experts = ", ".join(f'local("e{i}")' for i in range(n))
    block = f" {{\n{rules}\n}}" if rules else ""
    spec = write_spec(root, f'''use merging
model base = local("base")
models experts = [{experts}]
merge {name} = {merge}{block}
save {name} to "out/{name}"
''', f"{name}.fuse")
    rc, _, err = run_cli("run", str(spec), "-q")
    assert rc == 0, err
    return load_state(root / "out" / name)


def assert_same(mine: dict, ref: dict, tol: float = 1e-5, prefix: str = "") -> None:
    ref = {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}
    assert set(mine) == set(ref)
    worst = max((float((mine[k].float() - ref[k].float()).abs().max()) / (1.0 + float(ref[k].abs().max())), k)
                for k in ref)
    assert worst[0] <= tol, worst


def differs_from(mine: dict, other: dict, key: str, at_least: float = 1e-4) -> None:
    """The method did something: `key` is not what a simpler method gives."""
    assert float((mine[key] - other[key]).abs().max()) > at_least


def task_vectors(fam: dict, n: int) -> tuple[dict, list[dict]]:
    base = load_state(fam["base"])
    return base, [{k: v - base[k] for k, v in load_state(fam[f"e{i}"]).items()} for i in range(n)]


W = "model.layers.1.mlp.up_proj.weight"  # [64, 32]


@needs_fb
@pytest.mark.parametrize("fam_name,n,call,params", [
    ("three", 3, "alpha=0.7", {"alpha": 0.7}),
    ("three", 3, "weights=[0.5, 1.0, 1.5]", {"alpha": [0.5, 1.0, 1.5]}),  # FusionBench's list-valued alpha
    ("two", 2, "", {"alpha": 1}),
    ("dup", 3, "alpha=0.5", {"alpha": 0.5}),
])
def test_task_singular_vector_matches_fusionbench(fams, fam_name, n, call, params):
    fam = fams[fam_name]
    ref = fusionbench(Path(fam["base"]).parent, "tsvm", fam, n, **params)
    args = f", {call}" if call else ""
    mine = ours(fam, n, f"task_singular_vector(base, experts{args})")
    assert_same(mine, ref)
    ta = ours(fam, n, "task_arithmetic(base, experts, scale=1.0)")
    differs_from(mine, ta, W)
    # non-matrix tensors: the (weighted) mean of the task vectors, times alpha
    base, tvs = task_vectors(fam, n)
    w = params["alpha"] if isinstance(params["alpha"], list) else [1.0] * n
    a = params["alpha"] if not isinstance(params["alpha"], list) else 1.0
    k = "model.layers.0.input_layernorm.weight"
    assert torch.allclose(mine[k], base[k] + a * sum(wi * tv[k] for wi, tv in zip(w, tvs)) / n, atol=1e-6)


@needs_fb
@pytest.mark.parametrize("fam_name,n,alpha,weights", [("three", 3, 0.6, None), ("two", 2, None, [0.5, 2.0])])
def test_task_singular_vector_single_task_models_match_fusionbench(fams, fam_name, n, alpha, weights):
    """FusionBench's return_single_task_models=true: each task's model and the merged one."""
    fam = fams[fam_name]
    ref = fusionbench(Path(fam["base"]).parent, "tsvm", fam, n, alpha=weights or alpha, return_single_task_models=True)
    w = f", weights={weights}" if weights else ""
    tasks = [ours(fam, n, f"task_singular_vector_task(base, experts, task={t}{w})") for t in range(n)]
    for t in range(n):
        assert_same(tasks[t], ref, prefix=f"m{t}/")
    a = f", alpha={alpha}" if alpha else ""
    assert_same(ours(fam, n, f"task_singular_vector(base, experts{a}{w})"), ref, prefix="merged/")
    differs_from(tasks[0], tasks[1], W)


@needs_fb
@pytest.mark.parametrize("fam_name,n,scaling_factor", [("three", 3, 0.9), ("two", 2, 1.0)])
def test_iso_c_matches_fusionbench(fams, fam_name, n, scaling_factor):
    fam = fams[fam_name]
    ref = fusionbench(Path(fam["base"]).parent, "iso_c", fam, n, scaling_factor=scaling_factor)
    mine = ours(fam, n, f"iso_c_merge(base, experts, scaling_factor={scaling_factor})")
    assert_same(mine, ref)
    # the merged task vector of a matrix has one singular value, repeated
    base = load_state(fam["base"])
    s = torch.linalg.svdvals(mine[W] - base[W])
    assert float(s.max() - s.min()) <= 1e-4 * float(s.max())


@needs_fb
@pytest.mark.parametrize("fam_name,n,fraction,scaling_factor", [
    ("three", 3, 0.8, 1.0),  # r=32: common 26, 2 per task; r=16: common 13 (16·0.8=12, 4 → 3 task dirs), 1 each
    ("two", 2, 0.5, 0.7),
    ("two", 2, 0.0, 1.0),  # no common space: task-specific directions only
    ("dup", 3, 0.8, 1.0),
])
def test_iso_cts_matches_fusionbench(fams, fam_name, n, fraction, scaling_factor):
    fam = fams[fam_name]
    ref = fusionbench(Path(fam["base"]).parent, "iso_cts", fam, n, scaling_factor=scaling_factor,
                      common_space_fraction=fraction)
    mine = ours(fam, n, f"iso_cts_merge(base, experts, scaling_factor={scaling_factor}, "
                        f"common_space_fraction={fraction})")
    assert_same(mine, ref)
    iso_c = ours(fam, n, f"iso_c_merge(base, experts, scaling_factor={scaling_factor})")
    differs_from(mine, iso_c, W)


@needs_fb
@pytest.mark.parametrize("fam_name,scaling_factor", [("three", 0.5), ("tie", 1.0)])
def test_magmax_matches_fusionbench(fams, fam_name, scaling_factor):
    fam = fams[fam_name]
    ref = fusionbench(Path(fam["base"]).parent, "magmax", fam, 3, scaling_factor=scaling_factor)
    mine = ours(fam, 3, f"magmax(base, experts, scaling_factor={scaling_factor})")
    assert_same(mine, ref, tol=0.0 if fam_name == "tie" else 1e-6)
    if fam_name == "tie":  # e0 and e1 tie everywhere on q_proj: the later model's entry wins
        k = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(mine[k], load_state(fam["e1"])[k])


@needs_fb
@pytest.mark.parametrize("call,params", [
    ("prune_ratio=0.5", {"prune_ratio": 0.5}),
    ('prune_ratio=0.3, prune_type="major", rescale=3.3333333333333335', {"prune_ratio": 0.3, "prune_type": "major",
                                                                           "rescale": True}),
    ("prune_ratio=0.25, rescale=0", {"prune_ratio": 0.25, "rescale": False}),  # FusionBench's rescale: false
])
def test_magnitude_diff_pruning_matches_fusionbench(fams, call, params):
    fam = fams["three"]
    ref = fusionbench(Path(fam["base"]).parent, "magnitude_diff_pruning", fam, 1, **params)
    # FusionBench prunes nn.Linear weights only: the embedding keeps the base's values
    mine = ours(fam, 1, f"magnitude_diff_pruning(base, experts[0], {call})", '    "embed_tokens.weight" => base')
    assert_same(mine, ref)
    base = load_state(fam["base"])
    kept = (mine[W] != base[W]).sum(dim=1)
    if params.get("rescale") is not False:
        assert torch.equal(kept, torch.full_like(kept, 32 - int(32 * params["prune_ratio"])))


@needs_fb
@pytest.mark.parametrize("call,method,params", [
    ("sparsity_ratio=0.5", "prune_unstructured", {"sparsity_ratio": 0.5}),
    ("sparsity_ratio=0.3", "prune_unstructured", {"sparsity_ratio": 0.3}),
    ('prune_type="semistructured"', "prune_semistructured", {"n": 2, "m": 4}),
    ('prune_type="semistructured", n=1, m=3', "prune_semistructured", {"n": 1, "m": 3}),  # trailing groups of 2 and 1
])
def test_magnitude_pruning_matches_fusionbench(fams, call, method, params):
    fam = fams["three"]
    ref = fusionbench(Path(fam["base"]).parent, method, fam, 1, **params)
    # MagnitudePruningForLlama prunes the decoder layers' Linear weights only
    mine = ours(fam, 1, f"magnitude_pruning(experts[0], {call})",
                '    "embed_tokens.weight" => experts[0]\n    "lm_head.weight" => experts[0]')
    assert_same(mine, ref, tol=0.0)
    zeros = int((mine[W] == 0).sum())
    assert zeros == (64 * int(32 * params["sparsity_ratio"]) if "sparsity_ratio" in params
                     else 64 * (32 // params["m"] * params["n"] + min(params["n"], 32 % params["m"])))


@needs_fb
@pytest.mark.parametrize("fam_name,n", [("three", 3), ("two", 2)])
def test_emr_merging_matches_fusionbench(fams, fam_name, n):
    """FusionBench's unified vector, masks and rescalers, applied per task as its
    EMRTaskModulator does; fusionlang: one output model per task."""
    fam = fams[fam_name]
    ref = fusionbench(Path(fam["base"]).parent, "emr", fam, n)
    outs = [ours(fam, n, f"emr_merging(base, experts, task={t})") for t in range(n)]
    for t in range(n):
        assert_same(outs[t], ref, prefix=f"m{t}/")
    differs_from(outs[0], outs[1], W)  # per-task masks and rescalers differ
    # the rescaler is model-wide: Σ_k mean|θ_k − θ0_k| = Σ_k mean|τ_0,k| over the whole
    # model, not tensor by tensor
    base, tvs = task_vectors(fam, n)
    got = {k: float((outs[0][k] - base[k]).abs().mean()) for k in base}
    want = {k: float(tvs[0][k].abs().mean()) for k in base}
    assert sum(got.values()) == pytest.approx(sum(want.values()), rel=1e-5)
    assert max(abs(got[k] / want[k] - 1) for k in base) > 1e-3


@needs_fb
@pytest.mark.parametrize("fam_name,n,alpha", [("three", 3, 0.5), ("three", 3, 0.9), ("two", 2, 0.2)])
def test_opcm_matches_fusionbench(fams, fam_name, n, alpha):
    """FusionBench's general OPCM class in the given order (shuffle_order=false)."""
    fam = fams[fam_name]
    ref = fusionbench(Path(fam["base"]).parent, "opcm", fam, n, alpha=alpha, shuffle_order=False,
                      save_on_every_step=False, evaluate_on_every_step=False)
    mine = ours(fam, n, f"opcm(base, experts, alpha={alpha})")
    assert_same(mine, ref)
    # the projection did something (not a rescaled task arithmetic) and the embedding,
    # not a Linear weight, is one
    base, tvs = task_vectors(fam, n)
    total = {k: sum(tv[k] for tv in tvs) for k in base}
    for k, projected in ((W, True), ("model.embed_tokens.weight", False)):
        d = mine[k] - base[k]
        cos = float((d * total[k]).sum() / (d.norm() * total[k].norm()))
        assert (cos < 1 - 1e-4) if projected else cos == pytest.approx(1.0, abs=1e-6), (k, cos)


def _tall_masks(base: dict, tvs: list[dict], lam: float) -> list[dict]:
    """The paper's TALL masks, written out from its code (nik-dim/tall_masks
    generate_task_masks): |θ0 − θt| > λ·|θ0 + Σ τ − θt|."""
    total = {k: sum(tv[k] for tv in tvs) for k in base}
    fts = [{k: base[k] + tv[k] for k in base} for tv in tvs]
    return [{k: (base[k] - ft[k]).abs() > (base[k] + total[k] - ft[k]).abs() * lam for k in base} for ft in fts], total


@pytest.mark.parametrize("lam", [0.6, 0.3])
def test_tall_mask_task_arithmetic_matches_the_paper(fams, lam):
    fam = fams["three"]
    base = load_state(fam["base"])
    masks, total = _tall_masks(base, [{k: load_state(fam[f"e{i}"])[k] - base[k] for k in base} for i in range(3)], lam)
    for t in range(3):
        mine = ours(fam, 3, f"tall_mask_task_arithmetic(base, experts, task={t}, tall_mask_lambda={lam})")
        ref = {k: base[k] + masks[t][k].float() * total[k] for k in base}
        assert_same(mine, ref, tol=1e-6)
        frac = float(masks[t][W].float().mean())
        assert 0.05 < frac < 0.95  # a real mask, neither all nor nothing


@pytest.mark.parametrize("k,scaling_factor", [(2, 0.3), (1, 0.5), (3, 1.0)])
def test_consensus_task_arithmetic_matches_the_paper(fams, k, scaling_factor):
    fam = fams["three"]
    base = load_state(fam["base"])
    masks, total = _tall_masks(base, [{n: load_state(fam[f"e{i}"])[n] - base[n] for n in base} for i in range(3)], 0.6)
    mine = ours(fam, 3, f"consensus_task_arithmetic(base, experts, k={k}, scaling_factor={scaling_factor})")
    ref = {n: base[n] + scaling_factor * (sum(m[n].float() for m in masks) >= k).float() * total[n] for n in base}
    assert_same(mine, ref, tol=1e-6)
    if k > 1:
        ta = ours(fam, 3, f"task_arithmetic(base, experts, scale={scaling_factor})")
        differs_from(mine, ta, W)


@needs_fb
def test_fusionbench_tall_mask_class_raises(fams):
    """FusionBench 0.2.33's TallMaskTaskArithmeticAlgorithm fails on any model pool
    (state_dict_sub over keep_vars state dicts mixes Parameters and Tensors), hence the
    paper-based tests above."""
    fam = fams["three"]
    with pytest.raises(AssertionError, match="Tensor type mismatch"):
        fusionbench(Path(fam["base"]).parent, "tall_mask", fam, 3, tall_mask_lambda=0.6)


def test_row_split_plans_give_identical_results(fams, tmp_path):
    """The elementwise and per-row methods split big tensors into row blocks (the split
    pass, here with tiny blocks): bit-identical to whole tensors."""
    from fusionlang.lang.checker import check_file
    from fusionlang.passes import cse, dce, fold, schedule
    from fusionlang.passes.split import split
    from fusionlang.plan.lower import Lowerer
    from fusionlang.runtime.scheduler import run_plan

    fam = {k: str(v) for k, v in fams["three"].items()}
    merges = {"mm": "magmax(base, experts)", "tall": "tall_mask_task_arithmetic(base, experts, task=2)",
              "cons": "consensus_task_arithmetic(base, experts)", "emr": "emr_merging(base, experts, task=1)",
              "pr": "magnitude_diff_pruning(base, experts[0], prune_type=\"major\")",
              "nm": "magnitude_pruning(experts[1], prune_type=\"semistructured\", n=1, m=3)"}
    outs = {}
    for label, block in (("whole", None), ("split", 200)):
        text = f'''use merging
model base = local("{fam['base']}")
models experts = [local("{fam['e0']}"), local("{fam['e1']}"), local("{fam['e2']}")]
''' + "".join(f"merge {n} = {m}\nsave {n} to \"{label}/{n}\"\n" for n, m in merges.items())
        spec = write_spec(tmp_path, text, f"{label}.fuse")
        plan = dce(cse(fold(Lowerer(check_file(str(spec))).lower())))
        if block:
            plan = split(plan, block_elements=block)
            for n in ("mm", "tall", "cons", "pr", "nm"):
                assert "model.embed_tokens.weight" in plan.outputs[n].blocks, n
        run_plan(schedule(plan), "cpu")
        outs[label] = {n: load_state(tmp_path / label / n) for n in merges}
    for n in merges:
        assert outs["whole"][n].keys() == outs["split"][n].keys()
        for k, v in outs["whole"][n].items():
            assert torch.equal(v, outs["split"][n][k]), (n, k)


@pytest.mark.parametrize("merge,code,needle", [
    ("iso_cts_merge(base, experts, common_space_fraction=0.0)", "E006", "common_space_fraction=0.0 leaves -1"),
    ("iso_cts_merge(base, experts, common_space_fraction=1.5)", "E006", "common_space_fraction"),
    ("task_singular_vector(base, experts, weights=[1, 2])", "E006", "2 weights for 3 models"),
    ('magnitude_pruning(experts[0], prune_type="semistructured", n=5, m=4)', "E006", "n=5 entries cannot be pruned"),
    ('magnitude_pruning(experts[0], prune_type="structured")', "E006", "not a valid prune_type"),
    ('magnitude_diff_pruning(base, experts[0], prune_type="minorr")', "E006", "not a valid prune_type"),
    ("magnitude_diff_pruning(base, experts[0], prune_ratio=1.2)", "E006", "prune_ratio"),
    ("tall_mask_task_arithmetic(base, experts, task=3)", "E006", "index"),
    ("tall_mask_task_arithmetic(base, experts, task=0, tall_mask_lambda=-1)", "E006", "tall_mask_lambda"),
    ("consensus_task_arithmetic(base, experts, k=-1)", "E006", "k=-1 is out of range"),
    ("emr_merging(base, experts, task=-4)", "E006", "index -4 is out of range"),
    ("opcm(base, experts, alpha=1.5)", "E006", "alpha=1.5 is out of range"),
    ("task_singular_vector_task(base, experts, task=3)", "E006", "task=3 is not one of the 3 models"),
    ("magmax(base, experts, scaling_factor=\"big\")", "E005", "scaling_factor"),
])
def test_bad_parameters_are_located_errors(fams, merge, code, needle):
    fam = fams["three"]
    root = Path(fam["base"]).parent
    spec = write_spec(root, f'''use merging
model base = local("base")
models experts = [local("e0"), local("e1"), local("e2")]
merge bad = {merge}
save bad to "out/bad"
''', "bad.fuse")
    rc, _, err = run_cli("check", str(spec))
    assert rc == 1, err
    assert f"error[{code}]" in err and needle in err, err
    assert "bad.fuse:4:" in err and "hint:" in err, err  # at the user's argument, with a hint
