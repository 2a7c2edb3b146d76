"""`slices` (MergeKit passthrough): shapes must agree with the model whose config the
output takes, and per-layer config lists follow the source layers (cases 03 and 04)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_state, run_cli, write_spec


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


def _llama(path, seed=0, **overrides):
    import transformers as tf

    cfg = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 128, "max_position_embeddings": 64, "tie_word_embeddings": False}
    cfg.update(overrides)
    torch.manual_seed(seed)
    return _save(tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)), path)


@pytest.mark.parametrize("what, other, bad_tensor, shapes", [
    ("vocab", {"vocab_size": 136}, "lm_head.weight", ("[136, 32]", "[128, 32]")),
    ("hidden", {"hidden_size": 64, "intermediate_size": 128}, "model.layers.2.", ("[64", "[32")),
])
def test_slices_of_different_sizes_are_refused(tmp_path, what, other, bad_tensor, shapes):
    a = _llama(tmp_path / "a")
    b = _llama(tmp_path / "b", seed=1, **other)
    spec = write_spec(tmp_path, f'model a = local("{a}")\nmodel b = local("{b}")\n'
                                f'merge deep = slices([layers(a, 0, 2), layers(b, 2, 4)])\n'
                                f'save deep to "{tmp_path / "out"}"\n')
    col = spec.read_text().splitlines()[2].index("layers(b") + 1
    for cmd in ("check", "compile", "run"):
        rc, out, err = run_cli(cmd, str(spec))
        text = out + err
        assert rc == 1, (cmd, text)
        assert f"spec.fuse:3:{col}: error[E014]" in text, (cmd, text)
        assert bad_tensor in text and all(s in text for s in shapes), (cmd, text)
    assert not (tmp_path / "out").exists()


def test_slices_layer_types_follow_source_layers(tmp_path):
    """Case 04: a Qwen2 whose layers 2-3 use sliding attention; output layers 0..5 are
    source layers 0,1,0,1,2,3, so their types must be full x4, sliding x2 (the old code
    cycled the source list). The logits equal a 6-layer Qwen2 built from the same
    tensors with those types."""
    import transformers as tf

    cfg = tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, use_sliding_window=True,
                         sliding_window=4, max_window_layers=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    q = _save(tf.Qwen2ForCausalLM(cfg), tmp_path / "q")
    src = json.loads((q / "config.json").read_text())
    assert src["layer_types"][:2] != src["layer_types"][2:]  # the input really mixes types
    spec = write_spec(tmp_path, f'model q = local("{q}")\nmerge deep = slices([layers(q, 0, 2), layers(q, 0, 4)])\n'
                                f'save deep to "{tmp_path / "out"}"\n')
    rc, out, err = run_cli("run", str(spec), "--device", "cpu", "-q")
    assert rc == 0, out + err
    order = [0, 1, 0, 1, 2, 3]
    got = json.loads((tmp_path / "out/config.json").read_text())
    want = [src["layer_types"][i] for i in order]
    assert got["layer_types"] == want and got["num_hidden_layers"] == 6
    sd = load_state(q)
    ref_sd = {k: v for k, v in sd.items() if ".layers." not in k}
    for j, i in enumerate(order):
        ref_sd.update({k.replace(f"model.layers.{i}.", f"model.layers.{j}.", 1): v
                       for k, v in sd.items() if k.startswith(f"model.layers.{i}.")})
    keep = {k: v for k, v in src.items() if k not in ("architectures", "transformers_version")}
    ref = tf.Qwen2ForCausalLM(tf.Qwen2Config(**{**keep, "num_hidden_layers": 6, "layer_types": want})).eval()
    ref.load_state_dict(ref_sd)
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.arange(1, 25).reshape(1, 24)  # longer than the sliding window
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, ref(ids).logits, atol=1e-5)


def test_slices_refuse_layer_index_lists_and_nested_configs(tmp_path):
    """A config list of layer indices cannot be renumbered, and a layer count inside a
    nested sub-config (multimodal checkpoints) is not sliced: both E014, never a config
    that silently disagrees with the tensors."""
    a = _llama(tmp_path / "a")
    cfg = json.loads((a / "config.json").read_text())
    for name, edit in (("idx", {"mlp_only_layers": [1, 3]}),
                       ("nested", {"text_config": {"num_hidden_layers": 4}})):
        d = tmp_path / name
        d.mkdir()
        for f in a.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        c = dict(cfg, **edit)
        if name == "nested":
            c.pop("num_hidden_layers")
        (d / "config.json").write_text(json.dumps(c))
        spec = write_spec(tmp_path, f'model m = local("{d}")\nmerge deep = slices([layers(m, 0, 2), layers(m, 1, 4)])\n'
                                    f'save deep to "{tmp_path / ("out_" + name)}"\n', f"{name}.fuse")
        rc, out, err = run_cli("check", str(spec))
        text = out + err
        assert rc == 1 and f"{name}.fuse:2:" in text and "error[E014]" in text, text
        assert ("mlp_only_layers" if name == "idx" else "text_config") in text, text
