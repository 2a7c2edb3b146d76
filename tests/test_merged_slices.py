"""Merged slices (issue 11 §1): a slices() item that merges layer ranges of several models,
MergeKit's slice with several `sources`, against mergekit-yaml 0.1.5 on the conformance
tests' tiny Llama family (gradients over each slice's layers, the embeddings and head
merged from the first and last slices' models at position 0); and the located errors."""

from __future__ import annotations

import pytest
from conftest import load_state, run_cli, write_spec
from test_errors import expect_error
from test_mergekit_conformance import MERGEKIT, assert_same, run_fuse, run_mergekit_batch

pytestmark = pytest.mark.skipif(MERGEKIT is None, reason="mergekit not installed (bash .ci/install_mergekit.sh)")


def src(model: str, a: int, b: int, params: str = "") -> str:
    return f"      - model: ./{model}\n        layer_range: [{a}, {b}]\n" + (
        f"        parameters: {{{params}}}\n" if params else "")


CASES = {
    "slerp_crossed": (("slices([slerp(layers(experts[0], 0, 2), layers(experts[1], 2, 4), t=[0.0, 1.0]), "
                      "slerp(layers(experts[0], 2, 4), layers(experts[1], 0, 2), t=[0.0, 1.0])])"),
                      "merge_method: slerp\nbase_model: ./e0\nslices:\n  - sources:\n" + src("e0", 0, 2)
                      + src("e1", 2, 4) + "  - sources:\n" + src("e0", 2, 4) + src("e1", 0, 2)
                      + "parameters:\n  t: [0.0, 1.0]\n"),
    "linear_offset": (("slices([linear([layers(experts[0], 0, 3), layers(experts[1], 1, 4)], [0.7, 0.3]), "
                      "layers(base, 3, 4)])"),
                      "merge_method: linear\nslices:\n  - sources:\n" + src("e0", 0, 3, "weight: 0.7")
                      + src("e1", 1, 4, "weight: 0.3") + "  - sources:\n" + src("base", 3, 4, "weight: 1.0")),
}


@pytest.fixture(scope="module")
def mergekit(mk_family):
    return run_mergekit_batch(mk_family[0], {name: yaml for name, (_, yaml) in CASES.items()})


@pytest.mark.parametrize("name", list(CASES))
def test_matches_mergekit(mk_family, mergekit, name):
    root, _ = mk_family
    mine = run_fuse(root, CASES[name][0], name)
    assert_same(mine, load_state(mergekit[name]))
    cfg = (root / "fl_out" / name / "config.json").read_text()
    assert '"num_hidden_layers": 4' in cfg


def test_offset_layers_are_read(mk_family):
    """Independent of MergeKit: output layer j of linear([layers(e0, 0, 3), layers(e1, 1, 4)])
    is 0.7 · e0 layer j + 0.3 · e1 layer j + 1."""
    root, fam = mk_family
    mine = run_fuse(root, "slices([linear([layers(experts[0], 0, 3), layers(experts[1], 1, 4)], [0.7, 0.3])])", "off")
    e0, e1 = load_state(fam["e0"]), load_state(fam["e1"])
    for j in range(3):
        k = f"model.layers.{j}.mlp.up_proj.weight"
        want = 0.7 * e0[k] + 0.3 * e1[f"model.layers.{j + 1}.mlp.up_proj.weight"]
        assert (mine[k] - want).abs().max() < 1e-6


@pytest.mark.parametrize("item,code,needle", [
    ("linear([layers(experts[0], 0, 2), layers(experts[1], 0, 3)], [0.5, 0.5])", "E006", "one length"),
    ("lerp(layers(experts[0], 0, 2), experts[1], 0.5)", "E005", "through layers"),
    ("lerp(layers(experts[0], 0, 2), layers(experts[1], 3, 5), 0.5)", "E006", "outside"),
])
def test_mistakes_are_located(mk_family, item, code, needle):
    root, _ = mk_family
    spec = write_spec(root, f'''use merging
model base = local("base")
models experts = [local("e0"), local("e1"), local("e2")]
merge m = slices([{item}])
save m to "out/m"
''', "bad.fuse")
    d = expect_error(run_cli("compile", str(spec)), code, line=4)
    assert needle in d["msg"], d
