"""fusionlang's mixing against FusionBench 0.2.33's own algorithms (its venv,
.ci/install_fusionbench.sh) on tiny causal LMs: depth upscaling (SOLAR) as `slices`.

FusionBench 0.2.33's `mixtral_upcycling` / `mixtral_merging` do not import under the
transformers its venv resolves to (5.x: `no_init_weights` moved, experts fused), so
`moe()`'s upcycling is tested against mergekit-moe and the base's own logits instead
(tests/test_moe.py). Skips when FusionBench is absent, except on CI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_state, make_causal_family, run_cli, run_reference, write_spec

FB_PYTHON = Path(os.environ.get("FUSIONBENCH_PYTHON") or REPO / ".venv-fusionbench/bin/python")
HAVE_FB = FB_PYTHON.is_file()
if not HAVE_FB and os.environ.get("CI"):
    raise RuntimeError("FusionBench is required on CI: run `bash .ci/install_fusionbench.sh`")
pytestmark = pytest.mark.skipif(not HAVE_FB, reason="fusion-bench not installed (bash .ci/install_fusionbench.sh)")


def _fusionbench(root: Path, cfg: dict) -> None:
    (root / "fb.json").write_text(json.dumps(cfg))
    run_reference(FB_PYTHON, REPO / "tests/reference/fusionbench_mixing.py", root / "fb.json")


def test_depth_upscaling_matches_fusionbench(tmp_path):
    from transformers import AutoModelForCausalLM

    f = make_causal_family(tmp_path, n_experts=0, seed=9)  # a 2-layer Llama
    # FusionBench layer_indices ["range(0,2)", 1, 0]: layers 0, 1, 1, 0
    _fusionbench(tmp_path, {"method": "depth_upscaling", "model": str(f["base"]),
                            "layer_indices": ["range(0,2)", 1, 0], "out": str(tmp_path / "fb")})
    spec = write_spec(tmp_path, '''model base = local("base")
merge deep = slices([layers(base, 0, 2), layers(base, 1, 2), layers(base, 0, 1)])
save deep to "out/deep"
''', "deep.fuse")
    rc, _, err = run_cli("run", str(spec), "-q")
    assert rc == 0, err
    mine, ref = load_state(tmp_path / "out" / "deep"), load_state(tmp_path / "fb")
    assert set(mine) == set(ref)
    assert all(torch.equal(mine[k], ref[k]) for k in ref)
    base = load_state(f["base"])  # layer 2 of the output is the base's layer 1, layer 3 its layer 0
    assert torch.equal(mine["model.layers.3.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    cfg, ref_cfg = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "out" / "deep", tmp_path / "fb"))
    assert cfg["num_hidden_layers"] == ref_cfg["num_hidden_layers"] == 4
    ids = torch.tensor([[2, 5, 9, 14, 7]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "deep")(ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "fb")(ids).logits
    assert torch.allclose(a, b, atol=1e-6)
