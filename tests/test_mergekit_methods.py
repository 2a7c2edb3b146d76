"""The MergeKit 0.1.5 methods of issue 11 (DELLA, Model Stock, NuSLERP, multi-SLERP,
Karcher, SCE, NearSwap, Arcee Fusion, RAM / RAM+, TIES and breadcrumbs with rescale)
against `mergekit-yaml` on tiny fp32 Llama families; DELLA's random path against an
independent computation of its keep probabilities; bad parameter values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_state, make_family, run_cli, write_spec
from test_errors import expect_error
from test_mergekit_conformance import MERGEKIT, run_fuse, run_mergekit, run_mergekit_batch

needs_mergekit = pytest.mark.skipif(MERGEKIT is None, reason="mergekit not installed (bash .ci/install_mergekit.sh)")
RTOL = 1e-6


@pytest.fixture(scope="module")
def quiet_zoo(tmp_path_factory):
    """Experts 1e-4 away from the base: task vectors whose mean square is below SCE's
    absolute 1e-6 threshold (its equal-weights branch)."""
    root = tmp_path_factory.mktemp("mkq")
    return root, make_family(root, "llama", n_experts=3, noise=1e-4, seed=5)


def per_model(params: dict[str, list], base: bool = True, models=("e0", "e1", "e2")) -> str:
    """A `models:` list with per-model parameters, e.g. {"weight": [1, 0.5, 2]}."""
    lines = ["base_model: ./base\n" if base else "", "models:\n"]
    for i, e in enumerate(models):
        p = ", ".join(f"{k}: {v[i]}" for k, v in params.items())
        lines.append(f"  - model: ./{e}\n" + (f"    parameters: {{{p}}}\n" if p else ""))
    return "".join(lines)


def assert_close(ours, theirs, rtol=RTOL):
    """Per tensor: max |ours - theirs| <= rtol * max |theirs|."""
    assert set(ours) == set(theirs)
    worst = max(((ours[k].double() - theirs[k].double()).abs().max().item()
                 / max(theirs[k].double().abs().max().item(), 1e-30), k) for k in ours)
    assert worst[0] <= rtol, f"max relative |diff| {worst[0]:.3g} at {worst[1]}"


W = [1.0, 0.5, 2.0]
CASES = {
    # DELLA with density 1 (no pruning: deterministic), weights, lambda, both normalizes
    "della_dense": ("della(base, experts, density=1.0, scale=0.8, weights=[1.0, 0.5, 2.0])",
                    "merge_method: della\n" + per_model({"weight": W, "density": [1.0] * 3})
                    + "parameters: {lambda: 0.8}\n"),
    "della_dense_sum": ('della(base, experts, density=1.0, merge="sum", weights=[1.0, 0.5, 2.0])',
                        "merge_method: della\n" + per_model({"weight": W, "density": [1.0] * 3})
                        + "parameters: {normalize: false}\n"),
    "della_linear_dense": ("della_linear(base, experts, density=1.0, scale=0.7, weights=[1.0, 0.5, 2.0])",
                           "merge_method: della_linear\n" + per_model({"weight": W, "density": [1.0] * 3})
                           + "parameters: {lambda: 0.7}\n"),
    "della_linear_dense_norm": ("della_linear(base, experts, density=1.0, normalize=true, weights=[1.0, 0.5, 2.0])",
                                "merge_method: della_linear\n" + per_model({"weight": W, "density": [1.0] * 3})
                                + "parameters: {normalize: true}\n"),
    # rescale (MergeKit's L1) on the deterministic sparsifiers
    "ties_rescale": ('ties(base, experts, density=0.3, rescale="l1", weights=[1.0, 0.5, 2.0])',
                     "merge_method: ties\n" + per_model({"weight": W, "density": [0.3] * 3})
                     + "parameters: {rescale: true}\n"),
    "breadcrumbs_rescale": ('breadcrumbs(base, experts, density=0.5, gamma=0.05, rescale="l1")',
                            "merge_method: breadcrumbs\n" + per_model({"weight": [1.0] * 3, "density": [0.5] * 3,
                                                                      "gamma": [0.05] * 3})
                            + "parameters: {rescale: true}\n"),
    "breadcrumbs_ties_rescale": ('breadcrumbs(base, experts, density=0.4, gamma=0.02, consensus=true, rescale="l1")',
                                 "merge_method: breadcrumbs_ties\n"
                                 + per_model({"weight": [1.0] * 3, "density": [0.4] * 3, "gamma": [0.02] * 3})
                                 + "parameters: {rescale: true}\n"),
    "model_stock": ("model_stock(base, experts)", "merge_method: model_stock\n" + per_model({})),
    "model_stock_two": ("model_stock(base, [experts[0], experts[2]])",
                        "merge_method: model_stock\n" + per_model({}, models=("e0", "e2"))),
    "model_stock_filter_wise": ("model_stock(base, experts, filter_wise=true)",
                                "merge_method: model_stock\n" + per_model({}) + "parameters: {filter_wise: true}\n"),
    "nuslerp_base": ("nuslerp([experts[0], experts[1]], [0.3, 0.7], base=base)",
                     "merge_method: nuslerp\n" + per_model({"weight": [0.3, 0.7]}, models=("e0", "e1"))),
    "nuslerp_rows": ("nuslerp([experts[0], experts[1]], [0.6, 0.2], base=base, nuslerp_flatten=false)",
                     "merge_method: nuslerp\n" + per_model({"weight": [0.6, 0.2]}, models=("e0", "e1"))
                     + "parameters: {nuslerp_flatten: false}\n"),
    "nuslerp_columns": (("nuslerp([experts[0], experts[1]], [0.6, 0.2], base=base, nuslerp_flatten=false, "
                        "nuslerp_row_wise=true)"),
                        "merge_method: nuslerp\n" + per_model({"weight": [0.6, 0.2]}, models=("e0", "e1"))
                        + "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n"),
    "nuslerp_no_base": ("nuslerp([experts[1], experts[2]], [1.0, 3.0])",
                        "merge_method: nuslerp\n" + per_model({"weight": [1.0, 3.0]}, base=False, models=("e1", "e2"))),
    "nuslerp_zero_total": ("nuslerp([experts[0], experts[1]], [0.5, -0.5], base=base)",
                           "merge_method: nuslerp\n" + per_model({"weight": [0.5, -0.5]}, models=("e0", "e1"))),
    "multislerp_base": ("multislerp(experts, [0.2, 0.3, 0.5], base=base)",
                        "merge_method: multislerp\n" + per_model({"weight": [0.2, 0.3, 0.5]})),
    "multislerp_no_base": ("multislerp(experts, [1.0, 2.0, 1.0], normalize_weights=false)",
                           "merge_method: multislerp\n" + per_model({"weight": [1.0, 2.0, 1.0]}, base=False)
                           + "parameters: {normalize_weights: false}\n"),
    "multislerp_one": ("multislerp([experts[1]], [1.0], base=base)",
                       "merge_method: multislerp\n" + per_model({"weight": [1.0]}, models=("e1",))),
    "karcher": ("karcher(experts)", "merge_method: karcher\n" + per_model({}, base=False)),
    "karcher_with_base": ("karcher([base, experts[0], experts[1]], max_iter=3, tol=0.0001)",
                          "merge_method: karcher\n" + per_model({}, models=("e0", "e1"))
                          + "parameters: {max_iter: 3, tol: 0.0001}\n"),
    "sce_all": ("sce(base, experts)", "merge_method: sce\n" + per_model({})),
    "sce_topk": ("sce(base, experts, select_topk=0.3)",
                 "merge_method: sce\n" + per_model({}) + "parameters: {select_topk: 0.3}\n"),
    "nearswap": ("nearswap(base, experts[0], 0.01)",
                 "merge_method: nearswap\n" + per_model({}, models=("e0",)) + "parameters: {t: 0.01}\n"),
    "nearswap_wide": ("nearswap(base, experts[1], 0.5)",
                      "merge_method: nearswap\n" + per_model({}, models=("e1",)) + "parameters: {t: 0.5}\n"),
    "arcee_fusion": ("arcee_fusion(base, experts[2])", "merge_method: arcee_fusion\n" + per_model({}, models=("e2",))),
    "ram": ("ram(base, experts, epsilon=0.02)",
            "merge_method: ram\n" + per_model({}) + "parameters: {epsilon: 0.02}\n"),
    "ram_default": ("ram(base, experts)", "merge_method: ram\n" + per_model({})),
    "ramplus_tl": ("ramplus_tl(base, experts, r=0.5, alpha=0.3, epsilon=0.02)",
                   "merge_method: ramplus_tl\n" + per_model({}) + "parameters: {r: 0.5, alpha: 0.3, epsilon: 0.02}\n"),
    "ramplus_tl_default": ("ramplus_tl(base, experts, epsilon=0.035)",
                           "merge_method: ramplus_tl\n" + per_model({}) + "parameters: {epsilon: 0.035}\n"),
}


@pytest.fixture(scope="module")
def mergekit_outputs(mk_family):
    """Every case's MergeKit output, from one MergeKit process (start-up paid once)."""
    root, _ = mk_family
    return run_mergekit_batch(root, {name: yaml for name, (_, yaml) in CASES.items()})


@needs_mergekit
@pytest.mark.parametrize("name", sorted(CASES))
def test_same_output_as_mergekit(mk_family, mergekit_outputs, name):
    root, _ = mk_family
    body, _yaml = CASES[name]
    assert_close(run_fuse(root, body, name), load_state(mergekit_outputs[name]))


@needs_mergekit
@pytest.mark.parametrize("name", ["sce_all", "sce_topk"])
def test_sce_equal_weights_branch_matches_mergekit(quiet_zoo, name):
    """Task vectors ~1e-4: Σ mean(τ²) < 1e-6, so SCE weighs the models equally."""
    root, fam = quiet_zoo
    base = load_state(fam["base"])
    e0 = load_state(fam["e0"])
    assert max(((e0[k] - base[k]) ** 2).mean().item() for k in base) * 3 < 1e-6
    body, yaml = CASES[name]
    assert_close(run_fuse(root, body, name), run_mergekit(root, yaml, name))


# ---------------------------------------------------------------- DELLA's random path
def magprune_probs(delta: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """Keep probabilities written from the paper's definition, row by row, in numpy."""
    rows = delta.reshape(1, -1) if delta.ndim < 2 else delta
    out = np.empty(rows.shape)
    n = rows.shape[1]
    for i, row in enumerate(rows):
        rank = np.empty(n)
        rank[np.argsort(np.abs(row), kind="stable")] = np.arange(n)
        out[i] = density - epsilon + 2 * epsilon * rank / (n - 1)
    return out.reshape(delta.shape)


def run_della(root, body: str, name: str):
    return run_fuse(root, body, name)


@pytest.mark.parametrize("rescale", ["none", "inverse", "l1"])
def test_della_random_path_invariants(mk_family, rescale):
    """One model, density 0.4 ± 0.3: kept entries are the delta's own (÷ p for
    "inverse", times the L1 factor for "l1"); the kept fraction is 0.4 and follows the
    magnitude rank as the formula says."""
    root, fam = mk_family
    density, eps = 0.4, 0.3
    out = run_della(root, f'della_linear(base, [experts[0]], density={density}, epsilon={eps}, rescale="{rescale}")',
                    f"della_{rescale}")
    base, e0 = load_state(fam["base"]), load_state(fam["e0"])
    kept_total, n_total, low_kept, low_n, high_kept, high_n = 0, 0, 0, 0, 0, 0
    for k in base:
        delta = (e0[k] - base[k]).numpy().astype(np.float64)
        got = (out[k] - base[k]).numpy().astype(np.float64)
        probs = magprune_probs(delta, density, eps)
        kept = (out[k] != base[k]).numpy()
        if rescale == "none":
            expect = np.where(kept, delta, 0.0)
        elif rescale == "inverse":
            expect = np.where(kept, delta / probs, 0.0)
        else:
            factor = np.abs(delta).sum() / np.abs(np.where(kept, delta, 0.0)).sum()
            expect = np.where(kept, delta * factor, 0.0)
            assert abs(np.abs(got).sum() - np.abs(delta).sum()) <= 1e-5 * np.abs(delta).sum(), k
        # got = (base + x) - base in float32: off by the rounding at |base + x|
        b = base[k].numpy().astype(np.float64)
        assert (np.abs(got - expect) <= 1e-6 * (np.abs(b) + np.abs(expect)) + 1e-12).all(), k
        kept_total += kept.sum()
        n_total += kept.size
        low, high = probs < density - eps / 2, probs > density + eps / 2  # bottom and top quarter of ranks
        low_kept, low_n = low_kept + kept[low].sum(), low_n + low.sum()
        high_kept, high_n = high_kept + kept[high].sum(), high_n + high.sum()
    # ~43k entries: the standard error of a rate is < 0.005; allow 5 of them
    assert abs(kept_total / n_total - density) < 0.025
    assert abs(low_kept / low_n - (density - 0.75 * eps)) < 0.035   # mean p over the bottom quarter
    assert abs(high_kept / high_n - (density + 0.75 * eps)) < 0.035  # and over the top quarter


def test_della_masks_are_seeded_per_tensor(mk_family):
    root, _ = mk_family
    a = run_della(root, "della(base, experts, density=0.5, seed=1)", "della_s1")
    b = run_della(root, "della(base, experts, density=0.5, seed=1)", "della_s1b")
    c = run_della(root, "della(base, experts, density=0.5, seed=2)", "della_s2")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@needs_mergekit
def test_della_statistics_match_mergekit(mk_family):
    """MergeKit draws from torch's RNG: compare what the method guarantees, per rank
    band: the kept fraction, and the L1 norm of each delta (rescale)."""
    root, fam = mk_family
    ours = run_della(root, "della_linear(base, [experts[1]], density=0.5, epsilon=0.25)", "della_mk")
    theirs = run_mergekit(root, "merge_method: della_linear\n"
                          + per_model({"weight": [1.0], "density": [0.5], "epsilon": [0.25]}, models=("e1",)),
                          "della_mk")
    base, e1 = load_state(fam["base"]), load_state(fam["e1"])
    rates = {"ours": [0, 0, 0], "theirs": [0, 0, 0]}
    n = [0, 0, 0]
    for k in base:
        delta = (e1[k] - base[k]).numpy().astype(np.float64)
        band = np.digitize(magprune_probs(delta, 0.5, 0.25), [0.5 - 0.25 / 3, 0.5 + 0.25 / 3])
        for who, res in (("ours", ours), ("theirs", theirs)):
            d = (res[k] - base[k]).double()
            assert torch.isclose(d.abs().sum(), torch.from_numpy(np.abs(delta)).sum(), rtol=1e-5), (who, k)
            kept = (res[k] != base[k]).numpy()
            for b in range(3):
                rates[who][b] += kept[band == b].sum()
        for b in range(3):
            n[b] += (band == b).sum()
    for b, expect in enumerate([0.5 - 0.25 * 2 / 3, 0.5, 0.5 + 0.25 * 2 / 3]):
        for who in rates:
            assert abs(rates[who][b] / n[b] - expect) < 0.03, (who, b, rates[who][b] / n[b])


# ---------------------------------------------------------------- ops on their own
def test_nslerp_colinear_pairs_interpolate_linearly():
    from fusionlang.ops import OPS

    a = torch.randn(4, 8)
    got = OPS["nslerp"].fn([a, 3 * a], [1.0, 1.0], row_wise=False, flatten=False)
    assert torch.allclose(got, 2 * a, rtol=1e-6)


def test_multislerp_antipodal_pair_falls_back_to_linear():
    from fusionlang.ops import OPS

    a = torch.randn(5, 3)
    got = OPS["sphere_barycenter"].fn([a, -a], [0.5, 0.5])
    assert torch.allclose(got, torch.zeros_like(a), atol=1e-7)


def test_model_stock_keeps_the_base_where_the_models_cancel():
    """Two task vectors at 180°: 1 + (N - 1) cos θ = 0, no finite t: the base."""
    from fusionlang.ops import OPS

    base, d = torch.randn(6, 4), torch.randn(6, 4)
    assert torch.equal(OPS["stock_average"].fn(base, [base + d, base - d]), base)
    # filter-wise: rows where they cancel keep the base, the others follow the formula
    d2 = d.clone()
    d2[:3] = 2 * d[:3]  # rows 0-2 agree (cos 1, t = 1: the average); rows 3-5 cancel
    got = OPS["stock_average"].fn(base, [base + d, base + d2 * torch.tensor([1.0] * 3 + [-1.0] * 3)[:, None]],
                                  filter_wise=True)
    assert torch.allclose(got[:3], base[:3] + 1.5 * d[:3], atol=1e-6)
    assert torch.equal(got[3:], base[3:])


def test_karcher_of_zero_tensors_is_zero():
    from fusionlang.ops import OPS

    z = torch.zeros(3, 3)
    assert torch.equal(OPS["karcher_mean"].fn([z, z.clone()]), z)


def test_multislerp_cancelling_models_beyond_two_are_an_error():
    from fusionlang.ops import OPS
    from fusionlang.runtime.errors import RunError

    a = torch.randn(4, 4)
    with pytest.raises(RunError) as e:
        OPS["sphere_barycenter"].fn([a, -a, a, -a])
    assert e.value.code == "E006"


def test_multislerp_of_unchanged_tensors_is_the_base(mk_family, tmp_path):
    """A tensor no fine-tune changed has zero task vectors: the barycenter is the base
    there (MergeKit fails on it); and where models really cancel, the error is located
    at the save and names the tensor."""
    from safetensors.torch import save_file

    _root, fam = mk_family
    base = load_state(fam["base"])
    key = "model.layers.0.mlp.up_proj.weight"
    for i in range(3):  # copies whose `key` is the base's, and otherwise the experts'
        d = tmp_path / f"c{i}"
        d.mkdir()
        state = load_state(fam[f"e{i}"])
        state[key] = base[key].clone()
        save_file(state, str(d / "model.safetensors"))
        (d / "config.json").write_text((fam["base"] / "config.json").read_text())
    spec = write_spec(tmp_path, """use merging
model base = local("{}")
merge m = multislerp([local("c0"), local("c1"), local("c2")], base=base)
save m to "out/m"
""".format(fam["base"]), "ms.fuse")
    rc, _, err = run_cli("run", str(spec), "-q")
    assert rc == 0, err
    got = load_state(tmp_path / "out" / "m")
    assert torch.equal(got[key], base[key])
    # task vectors that cancel exactly: a zero base, e0 and -e0
    e0 = load_state(fam["e0"])
    for name, state in (("zero", {k: torch.zeros_like(v) for k, v in e0.items()}),
                        ("neg", {k: -v for k, v in e0.items()})):
        d = tmp_path / name
        d.mkdir()
        save_file(state, str(d / "model.safetensors"))
        (d / "config.json").write_text((fam["base"] / "config.json").read_text())
    spec = write_spec(tmp_path, """use merging
model zero = local("zero")
merge m = multislerp([local("{}"), local("neg"), local("{}"), local("neg")], base=zero)
save m to "out/m2"
""".format(fam["e0"], fam["e0"]), "ms2.fuse")
    d = expect_error(run_cli("run", str(spec)), "E006", line=4)
    assert "tensor '" in d["msg"] and "ms2.fuse:3" in d["msg"]
    assert not (tmp_path / "out" / "m2").exists()


def test_match_norm_leaves_tiny_tensors_alone():
    """MergeKit's rescale skips tensors whose norms are below 1e-7 (either of them)."""
    from fusionlang.ops import OPS

    x, ref = torch.full((3, 3), 1e-10), torch.randn(3, 3)
    assert torch.equal(OPS["match_norm"].fn(x, ref), x)
    y = torch.randn(3, 3)
    got = OPS["match_norm"].fn(y, 2 * ref, norm="l2")
    assert torch.allclose(got.norm(), (2 * ref).norm(), rtol=1e-6)


def test_magprune_probabilities_single_column_and_extremes():
    """A row of one entry keeps it with probability density; density 1 keeps all,
    density 0 none."""
    from fusionlang.ops import OPS
    from fusionlang.ops.prune import magprune_probabilities

    col = torch.randn(5, 1)
    assert torch.equal(magprune_probabilities(col, 0.3, 0.1), torch.full((5, 1), 0.3))
    x = torch.randn(4, 6)
    assert torch.equal(OPS["magprune"].fn(x, density=1.0), x)
    assert torch.equal(OPS["magprune"].fn(x, density=0.0), torch.zeros_like(x))


def test_magprune_blocks_do_not_change_the_mask(monkeypatch):
    """Row blocks draw the same numbers and ranks as the whole tensor."""
    from fusionlang.ops import OPS, prune

    x = torch.randn(64, 300)
    whole = OPS["magprune"].fn(x, 0.4, 0.2, "inverse", 5)
    monkeypatch.setattr(prune, "BLOCK", 1000)  # 3 rows per block
    assert torch.equal(OPS["magprune"].fn(x, 0.4, 0.2, "inverse", 5), whole)


# ---------------------------------------------------------------- bad parameter values
def _spec(tmp_path, fam, body: str):
    return write_spec(tmp_path, f'''use merging
model base = local("{fam["base"]}")
models experts = [local("{fam["e0"]}"), local("{fam["e1"]}"), local("{fam["e2"]}")]
merge m = {body}
save m to "out/m"
''')


BAD = [
    ("della(base, experts, density=0.5, epsilon=0.6)", "0.6)", "epsilon"),
    ("della_linear(base, experts, density=0.9, epsilon=0.15)", "0.15)", "epsilon"),
    ("della(base, experts, density=1.5)", "1.5)", "[0, 1]"),
    ("della(base, experts, density=[0.3, 0.9], epsilon=0.15)", "0.15)", "epsilon"),  # at the last layer
    ('della(base, experts, rescale="l3")', '"l3"', "l1"),
    ('ties(base, experts, rescale="l7")', '"l7"', "l1"),
    ("model_stock(base, [experts[0]])", "[experts[0]]", "two or more"),
    ("nuslerp(experts, [1.0, 1.0, 1.0])", "experts,", "two"),
    ("nuslerp([experts[0], experts[1]], [1.0])", "[1.0]", "one weight per model"),
    ("multislerp(experts, [1.0, -1.0, 0.0])", "[1.0, -1.0, 0.0]", "normalize_weights=false"),
    ("sce(base, experts, select_topk=2.0)", "2.0)", "[0, 1]"),
    ("nearswap(base, experts[0], -0.1)", "-0.1", ""),
    ("ramplus_tl(base, experts, epsilon=0.0)", "0.0)", "positive epsilon"),
    ("karcher(experts, max_iter=-1)", "-1)", ""),
]


@pytest.mark.parametrize("body,at,hint", BAD, ids=[b[0].split("(")[0] + str(i) for i, b in enumerate(BAD)])
def test_bad_values_are_located_errors(tmp_path, llama, body, at, hint):
    p = _spec(tmp_path, llama, body)
    text = p.read_text()
    i = text.index(at, text.index("merge m ="))
    line = text[:i].count("\n") + 1
    col = i - text.rfind("\n", 0, i)
    expect_error(run_cli("check", str(p)), "E006", file=p, at=(line, col), hint=hint or True)
