"""Golden plan tests: tests/golden/plans/*.fuse -> expected *.plan (the text emission).

Refresh with FUSIONLANG_UPDATE_GOLDEN=1 (never by hand)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import save_file

GOLDEN = Path(__file__).parent / "golden" / "plans"
UPDATE = os.environ.get("FUSIONLANG_UPDATE_GOLDEN") == "1"


def make_toy(root: Path, seed: int) -> None:
    """A 2-layer toy model with 6 tensors: compact plans that still show layers."""
    g = torch.Generator().manual_seed(seed)
    names = {"model.embed.weight": (8, 4), "model.layers.0.mlp.weight": (4, 4), "model.layers.0.norm.weight": (4,),
             "model.layers.1.mlp.weight": (4, 4), "model.layers.1.norm.weight": (4,), "model.norm.weight": (4,)}
    root.mkdir(parents=True)
    save_file({k: torch.randn(s, generator=g) for k, s in names.items()}, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden")
    for i, name in enumerate(("base", "a", "b")):
        make_toy(d / "models" / name, i)
    return d


@pytest.mark.parametrize("spec", sorted(GOLDEN.glob("*.fuse")), ids=lambda p: p.stem)
def test_golden_plan(workdir, spec):
    shutil.copy(spec, workdir / spec.name)
    rc, out, err = run_cli("compile", spec.name, "--emit", "text", "-q", cwd=workdir)
    assert rc == 0, err
    expected = spec.with_suffix(".plan")
    if UPDATE:
        expected.write_text(out)
    assert expected.exists(), f"missing {expected.name}: run with FUSIONLANG_UPDATE_GOLDEN=1"
    assert out == expected.read_text()
    # and the plan is deterministic: compiling again gives the same text
    assert run_cli("compile", spec.name, "--emit", "text", "-q", cwd=workdir)[1] == out
    # and it runs
    rc, _, err = run_cli("run", spec.name, "-q", cwd=workdir)
    assert rc == 0, err
