"""Merge, save, reload with transformers' Auto classes and run a forward pass."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_family, run_cli, write_spec


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "vit"])
def test_merge_reload_forward(tmp_path, arch):
    import transformers as tf

    fam = make_family(tmp_path / "models", arch, n_experts=2)
    spec = write_spec(tmp_path, f'''use merging
model base = local("{fam['base']}")
models experts = [local("{fam['e0']}"), local("{fam['e1']}")]
merge t = ties(base, experts, density=0.3) {{
    "*embeddings*" => base
}}
save t to "out/t" as bf16
''' if arch in ("bert", "vit") else f'''use merging
model base = local("{fam['base']}")
models experts = [local("{fam['e0']}"), local("{fam['e1']}")]
merge t = task_arithmetic(base, experts, scale=0.5)
save t to "out/t" as bf16
''')
    rc, _, err = run_cli("run", str(spec), "-q")
    assert rc == 0, err
    out = tmp_path / "out/t"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == arch
    auto = {"llama": tf.AutoModelForCausalLM, "gpt2": tf.AutoModelForCausalLM, "bert": tf.AutoModel,
            "vit": tf.AutoModelForImageClassification}[arch]
    model = auto.from_pretrained(out, dtype=torch.float32)
    base = auto.from_pretrained(fam["base"], dtype=torch.float32)
    with torch.no_grad():
        if arch == "vit":
            x = torch.randn(1, 3, 16, 16)
            y, y0 = model(pixel_values=x).logits, base(pixel_values=x).logits
        else:
            ids = torch.arange(6).reshape(1, 6)
            y = model(ids)[0]
            y0 = base(ids)[0]
    assert y.shape == y0.shape and torch.isfinite(y).all()
    assert not torch.allclose(y, y0)  # the merge changed the model
    assert (out / "README.md").read_text().count("```fuse") == 1
    assert not list(tmp_path.glob("out/.*tmp*"))


def test_sharded_output_and_input(tmp_path, llama):
    """--shard-size splits the output with an index; a sharded model reads back as input."""
    spec = write_spec(tmp_path, f'''model a = local("{llama['e0']}")
merge m = a * 1.0
save m to "out/m"
''')
    rc, _, err = run_cli("run", str(spec), "-q", "--shard-size", "0.00005")
    assert rc == 0, err
    out = tmp_path / "out/m"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    spec2 = write_spec(tmp_path, '''model a = local("out/m")
merge m2 = a * 2.0
save m2 to "out/m2"
''', "again.fuse")
    rc, _, err = run_cli("run", str(spec2), "-q")
    assert rc == 0, err
    from conftest import load_state

    a, b = load_state(out), load_state(tmp_path / "out/m2")
    assert all(torch.allclose(b[k], 2 * a[k]) for k in a)
    import transformers as tf

    tf.AutoModelForCausalLM.from_pretrained(out)


def test_demo_command(tmp_path):
    rc, _out, err = run_cli("demo", "--dir", str(tmp_path / "demo"))
    assert rc == 0, err
    assert (tmp_path / "demo/out/deep/config.json").exists()
    assert json.loads((tmp_path / "demo/out/deep/config.json").read_text())["num_hidden_layers"] == 6
