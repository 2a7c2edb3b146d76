"""Per-model values (issue 11 §1): `per_model([...])` against MergeKit 0.1.5's per-model
parameters (a `parameters:` block per model in `models:`), with per-tensor weights as
rules (MergeKit's `filter:` lists), on the tiny Llama family of the conformance tests;
and the located error where one value applies to all models."""

from __future__ import annotations

import pytest
from conftest import load_state, run_cli, write_spec
from test_errors import expect_error
from test_mergekit_conformance import MERGEKIT, assert_same, run_fuse, run_mergekit_batch

pytestmark = pytest.mark.skipif(MERGEKIT is None, reason="mergekit not installed (bash .ci/install_mergekit.sh)")


def per_model_yaml(method: str, params: list[str], extra: str = "") -> str:
    return (f"merge_method: {method}\nbase_model: ./base\nmodels:\n"
            + "".join(f"  - model: ./e{i}\n    parameters:\n{p}" for i, p in enumerate(params)) + extra)


CASES = {
    "ties_density": ("ties(base, experts, density=per_model([0.5, 0.3, 0.7]), weights=[1.0, 0.5, 0.8])",
                     per_model_yaml("ties", [f"      density: {d}\n      weight: {w}\n"
                                             for d, w in ((0.5, 1.0), (0.3, 0.5), (0.7, 0.8))])),
    "breadcrumbs_gamma": (('breadcrumbs(base, experts, density=per_model([0.8, 0.6, 0.9]), '
                          'gamma=per_model([0.01, 0.05, 0.0]), consensus=true, merge="mean")'),
                          per_model_yaml("breadcrumbs_ties", [f"      density: {d}\n      gamma: {g}\n      weight: 1.0\n"
                                                              for d, g in ((0.8, 0.01), (0.6, 0.05), (0.9, 0.0))],
                                         "parameters:\n  normalize: true\n")),
    # a per-model gradient, and per-tensor weights (MergeKit `filter:`) as a rule
    "ties_gradient_filter": ('''ties(base, experts, density=per_model([[0.2, 0.6], 0.4, 0.5]), weights=[1.0, 1.0, 1.0]) {
    "*self_attn*" => ties(base, experts, density=per_model([[0.2, 0.6], 0.4, 0.5]), weights=[0.3, 1.0, 1.0])
}''', per_model_yaml("ties", [
        "      density: [0.2, 0.6]\n      weight:\n        - filter: self_attn\n          value: 0.3\n        - value: 1.0\n",
        "      density: 0.4\n      weight: 1.0\n",
        "      density: 0.5\n      weight: 1.0\n"])),
}


@pytest.fixture(scope="module")
def mergekit(mk_family):
    root, _ = mk_family
    return run_mergekit_batch(root, {name: yaml for name, (_, yaml) in CASES.items()})


@pytest.mark.parametrize("name", list(CASES))
def test_matches_mergekit(mk_family, mergekit, name):
    root, _ = mk_family
    assert_same(run_fuse(root, CASES[name][0], name), load_state(mergekit[name]))


def test_per_model_differs_from_the_same_value_for_all(mk_family):
    """The per-model densities are used (a can-fail check next to the reference): the
    result is not ties at any one of the three densities."""
    root, _ = mk_family
    mine = run_fuse(root, "ties(base, experts, density=per_model([0.2, 0.5, 0.8]))", "pm")
    for d in (0.2, 0.5, 0.8):
        one = run_fuse(root, f"ties(base, experts, density={d})", f"one_{int(d * 10)}")
        assert any(not (mine[k] == one[k]).all() for k in mine)


@pytest.mark.parametrize("body,needle", [
    ("task_arithmetic(base, experts, scale=per_model([0.3, 0.5, 0.2]))", "'*' takes one value"),
    ("ties(base, experts, density=per_model([0.3, 0.5]))", "'trim' takes one value"),
])
def test_one_value_for_all_models_is_located(mk_family, body, needle):
    root, _ = mk_family
    spec = write_spec(root, f'''use merging
model base = local("base")
models experts = [local("e0"), local("e1"), local("e2")]
merge bad = {body}
save bad to "out/bad"
''', "bad.fuse")
    d = expect_error(run_cli("compile", str(spec)), "E006", at=(4, body.index("per_model") + len("merge bad = ") + 1))
    assert "per_model" in d["msg"] and needle in d["msg"], d
