"""`--device cuda` against `--device cpu` on the same spec: elementwise merges, TIES' top-k
selection, DARE's seeded masks (drawn on the host: the same on every device), SLERP, a
row-split tensor and a model stage (RegMean's Gram matrices on the GPU). Skipped where
CUDA is absent; run them on a GPU machine (docs/cluster.md, "GPU").

`FUSIONLANG_TEST_DEVICE=cpu` runs the same comparisons with the CPU as the "device" (a
check of the tests themselves on a machine without a GPU)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import load_state, make_classifier_family, make_family, run_cli, write_spec

DEVICE = os.environ.get("FUSIONLANG_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="needs CUDA (or FUSIONLANG_TEST_DEVICE=cpu)")

SPEC = '''use merging
model base = local("base")
models experts = [local("e0"), local("e1"), local("e2")]
merge ta = task_arithmetic(base, experts, scale=0.4)
merge t = ties(base, experts, density=0.3)
merge d = dare(base, experts, density=0.5, consensus=true, seed=7)
merge s = slerp(experts[0], experts[1], t=0.3)
merge tsv = task_singular_vector(base, experts)
save ta to "OUT/ta"
save t to "OUT/t"
save d to "OUT/d"
save s to "OUT/s" as bf16
save tsv to "OUT/tsv"
'''


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpufam")
    # vocab 33000 × 128: the embedding and head are split into row blocks (4M entries per block)
    make_family(root, "llama", n_experts=3, vocab_size=33000, hidden_size=128, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return root


def test_merges_on_the_device_equal_the_cpu(fam):
    for dev in ("cpu", DEVICE):
        spec = write_spec(fam, SPEC.replace("OUT", f"out-{dev}"), f"{dev}.fuse")
        rc, _, err = run_cli("run", str(spec), "--device", dev)
        assert rc == 0, err
    for out in ("ta", "t", "d", "s", "tsv"):
        host, dev = load_state(fam / "out-cpu" / out), load_state(fam / f"out-{DEVICE}" / out)
        assert host.keys() == dev.keys()
        for k in host:
            a, b = host[k].float(), dev[k].float()
            tol = 1e-2 if out == "s" else (1e-4 if out == "tsv" else 1e-6)  # bf16 output; an SVD
            assert torch.allclose(a, b, rtol=tol, atol=tol), (out, k, float((a - b).abs().max()))
            if out in ("t", "d"):  # the same entries kept: selection and masks agree exactly
                assert torch.equal(a == 0, b == 0), (out, k)


def test_a_model_stage_on_the_device_equals_the_cpu(tmp_path, monkeypatch):
    fam = make_classifier_family(tmp_path, n_experts=2, rows=24, seed=2)
    for dev in ("cpu", DEVICE):
        monkeypatch.setenv("FUSIONLANG_CACHE", str(tmp_path / f"cache-{dev}"))
        spec = write_spec(tmp_path, f'''use merging
models experts = [local("{fam['e0']}"), local("{fam['e1']}")]
data d = dataset("{fam['data0']}", text="text", n=16)
merge rm = regmean(experts, [d, d], batch_size=4)
save rm to "out-{dev}/rm"
''', f"{dev}.fuse")
        rc, _, err = run_cli("run", str(spec), "--device", dev)
        assert rc == 0, err
    host, dev = load_state(tmp_path / "out-cpu" / "rm"), load_state(tmp_path / f"out-{DEVICE}" / "rm")
    for k in host:
        assert torch.allclose(host[k], dev[k], rtol=1e-4, atol=1e-5), (k, float((host[k] - dev[k]).abs().max()))
