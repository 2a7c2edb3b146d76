"""fusionlang vs MergeKit (mergekit-yaml, installed by .ci/install_mergekit.sh into its own
venv) on the same tiny fp32 Llama inputs. Skips when MergeKit is absent, except on CI."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_state, run_cli, write_spec


def _mergekit() -> str | None:
    cand = os.environ.get("MERGEKIT_YAML") or str(REPO / ".venv-mergekit/bin/mergekit-yaml")
    return cand if Path(cand).is_file() else shutil.which("mergekit-yaml")


MERGEKIT = _mergekit()
if MERGEKIT is None and os.environ.get("CI"):
    raise RuntimeError("MergeKit is required on CI: run `bash .ci/install_mergekit.sh`")
pytestmark = pytest.mark.skipif(MERGEKIT is None, reason="mergekit not installed (bash .ci/install_mergekit.sh)")


def run_mergekit(root: Path, yaml: str, name: str) -> dict[str, torch.Tensor]:
    cfg = root / f"{name}.yml"
    cfg.write_text(yaml + "dtype: float32\nout_dtype: float32\n")
    out = root / "mk_out" / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([MERGEKIT, str(cfg), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
                        "--random-seed", "0"], cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_state(out)


def run_mergekit_batch(root: Path, yamls: dict[str, str], copy_tokenizer: bool = False) -> dict[str, Path]:
    """Every configuration of `yamls` (name -> YAML) merged by one MergeKit process
    (tests/reference/mergekit_batch.py: MergeKit's own run_merge, with the CLI's
    options), as `run_mergekit` would one by one; returns name -> output directory."""
    import json

    jobs = []
    for name, yaml in yamls.items():
        cfg = root / f"{name}.yml"
        cfg.write_text(yaml + "dtype: float32\nout_dtype: float32\n")
        jobs.append({"config": str(cfg), "out": str(root / "mk_out" / name), "copy_tokenizer": copy_tokenizer})
    spec = root / "mk_batch.json"
    spec.write_text(json.dumps({"cwd": str(root), "jobs": jobs}))
    python = Path(MERGEKIT).parent / "python"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([str(python), str(REPO / "tests/reference/mergekit_batch.py"), str(spec)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=1200, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return {name: root / "mk_out" / name for name in yamls}


def run_fuse(root: Path, body: str, name: str) -> dict[str, torch.Tensor]:
    spec = write_spec(root, f'''use merging
model base = local("base")
models experts = [local("e0"), local("e1"), local("e2")]
merge m_{name} = {body}
save m_{name} to "fl_out/{name}"
''', f"{name}.fuse")
    rc, _, err = run_cli("run", str(spec), "-q")
    assert rc == 0, err
    return load_state(root / "fl_out" / name)


def models_yaml(params: str, base: bool = True) -> str:
    lines = ["base_model: ./base\n" if base else "", "models:\n"]
    for e in ("e0", "e1", "e2"):
        lines.append(f"  - model: ./{e}\n    parameters: {{{params}}}\n")
    return "".join(lines)


def assert_same(ours, theirs, tol=2e-6):
    assert set(ours) == set(theirs)
    worst = max(((ours[k].float() - theirs[k].float()).abs().max().item(), k) for k in ours)
    assert worst[0] <= tol, f"max |diff| {worst[0]:.3g} at {worst[1]}"


CASES = {
    "linear": ("linear(experts, [0.5, 0.3, 0.2])",
               "merge_method: linear\nmodels:\n" + "".join(
                   f"  - model: ./{e}\n    parameters: {{weight: {w}}}\n" for e, w in zip(("e0", "e1", "e2"), (0.5, 0.3, 0.2)))),
    "task_arithmetic": ("task_arithmetic(base, experts, scale=0.3)",
                        "merge_method: task_arithmetic\n" + models_yaml("weight: 1.0") + "parameters: {lambda: 0.3}\n"),
    "ties": ("ties(base, experts, density=0.2)", "merge_method: ties\n" + models_yaml("weight: 1.0, density: 0.2")),
    "ties_weighted": ("ties(base, experts, density=0.3, scale=0.8, weights=[1.0, 0.5, 2.0])",
                      "merge_method: ties\nbase_model: ./base\nmodels:\n" + "".join(
                          f"  - model: ./{e}\n    parameters: {{weight: {w}, density: 0.3}}\n"
                          for e, w in zip(("e0", "e1", "e2"), (1.0, 0.5, 2.0))) + "parameters: {lambda: 0.8}\n"),
    "dare_ties_dense": ("dare(base, experts, density=1.0, consensus=true)",
                        "merge_method: dare_ties\n" + models_yaml("weight: 1.0, density: 1.0")),
    "breadcrumbs": ("breadcrumbs(base, experts, density=0.5, gamma=0.01)",
                    "merge_method: breadcrumbs\n" + models_yaml("weight: 1.0, density: 0.5, gamma: 0.01")),
    "breadcrumbs_ties": ('breadcrumbs(base, experts, density=0.5, gamma=0.01, consensus=true, merge="mean")',
                         "merge_method: breadcrumbs_ties\n" + models_yaml("weight: 1.0, density: 0.5, gamma: 0.01")
                         + "parameters: {normalize: true}\n"),
    "slerp": ('''slerp(base, experts[0], t=0.5) {
    "*self_attn*" => slerp(base, experts[0], t=[0.0, 0.5, 0.3, 0.7, 1.0])
    "*mlp*" => slerp(base, experts[0], t=[1.0, 0.5, 0.7, 0.3, 0.0])
}''', """merge_method: slerp
base_model: ./base
models:
  - model: ./base
  - model: ./e0
parameters:
  t:
    - filter: self_attn
      value: [0.0, 0.5, 0.3, 0.7, 1.0]
    - filter: mlp
      value: [1.0, 0.5, 0.7, 0.3, 0.0]
    - value: 0.5
"""),
    "passthrough": ("slices([layers(base, 0, 3), layers(experts[0], 2, 4)])", """merge_method: passthrough
slices:
  - sources:
      - model: ./base
        layer_range: [0, 3]
  - sources:
      - model: ./e0
        layer_range: [2, 4]
"""),
}


@pytest.fixture(scope="module")
def mergekit_outputs(mk_family):
    """Every case's MergeKit output, from one MergeKit process (start-up paid once)."""
    root, _ = mk_family
    return run_mergekit_batch(root, {name: yaml for name, (_, yaml) in CASES.items()})


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_output_as_mergekit(mk_family, mergekit_outputs, name):
    root, _ = mk_family
    body, _yaml = CASES[name]
    ours = run_fuse(root, body, name)
    assert_same(ours, load_state(mergekit_outputs[name]))


def test_dare_l1_rescale_matches_mergekit_statistics(mk_family):
    """DARE masks come from different RNGs, so compare what the method guarantees:
    the kept fraction and the per-tensor L1 norm of each delta (MergeKit's rescale)."""
    root, fam = mk_family
    ours = run_fuse(root, 'dare(base, [experts[0]], density=0.5, rescale="l1", seed=0)', "dare_l1")
    theirs = run_mergekit(root, "merge_method: dare_linear\nbase_model: ./base\nmodels:\n"
                          "  - model: ./e0\n    parameters: {weight: 1.0, density: 0.5}\n", "dare_l1")
    base = load_state(fam["base"])
    for k in base:
        d_ours, d_theirs = ours[k] - base[k], theirs[k] - base[k]
        if d_ours.numel() >= 1024:
            assert abs((d_ours != 0).float().mean().item() - (d_theirs != 0).float().mean().item()) < 0.05, k
            assert torch.isclose(d_ours.abs().sum(), d_theirs.abs().sum(), rtol=1e-3), k
