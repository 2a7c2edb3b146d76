"""Model sources: the local Hugging Face cache (never the network) and header reading."""

from __future__ import annotations

import shutil

from conftest import load_state, run_cli, write_spec

from fusionlang.runtime.sources import read_model_dir


def fake_hf_cache(root, repo, src, commit="3f2a1c0ffee0000000000000000000000000000a"):
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    shutil.copytree(src, snap)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return commit


def test_hf_resolves_from_local_cache(llama, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    commit = fake_hf_cache(cache, "org/math-ft", llama["e0"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    spec = write_spec(tmp_path, f'''model a = hf("org/math-ft")
model b = hf("org/math-ft", revision="{commit[:8]}")
merge m = (a + b) / 2
save m to "out/m"
''')
    rc, _, err = run_cli("run", str(spec), "-q")
    assert rc == 0, err
    got, ref = load_state(tmp_path / "out/m"), load_state(llama["e0"])
    assert all((got[k] - ref[k]).abs().max() < 1e-6 for k in ref)


def test_hf_missing_repo_and_revision_name_the_cache(llama, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    fake_hf_cache(cache, "org/math-ft", llama["e0"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    spec = write_spec(tmp_path, '''model a = hf("org/nothere")
model b = hf("org/math-ft", revision="deadbeef")
merge m = a + b
save m to "out/m"
''')
    rc, _, err = run_cli("compile", str(spec), "-q")
    assert rc == 1
    assert "error[E017]" in err and str(cache) in err and "never downloads" in err
    assert "Traceback" not in err


def test_header_reading_needs_no_weights(llama):
    h = read_model_dir(llama["base"])
    assert h.num_layers == 4
    info = h.tensors["model.layers.0.mlp.up_proj.weight"]
    assert info.dtype == "F32" and info.shape == (64, 32)


def test_same_tensor_bytes_reads_whole_tensors_when_samples_agree(tmp_path):
    """A difference away from the sampled start, middle and end of a tensor is found by
    the full comparison; equal copies compare equal; dtype or shape differences too."""
    import torch
    from safetensors.torch import save_file

    from fusionlang.runtime.sources import read_safetensors_header, same_tensor_bytes

    x = torch.randn(256, 256)
    y = x.clone()
    y.view(-1)[256 * 256 // 3] += 1.0  # byte ~87k of 256k: outside the three 4 KiB samples
    save_file({"w": x, "h": x[:2].to(torch.bfloat16)}, tmp_path / "a.safetensors")
    save_file({"w": x}, tmp_path / "b.safetensors")
    save_file({"w": y, "h": x[:2].to(torch.float16)}, tmp_path / "c.safetensors")
    a, b, c = (read_safetensors_header(tmp_path / f"{n}.safetensors") for n in "abc")
    assert same_tensor_bytes([(a["w"], "w", b["w"], "w")])
    assert not same_tensor_bytes([(a["w"], "w", c["w"], "w")])
    assert not same_tensor_bytes([(a["w"], "w", b["w"], "w"), (a["h"], "h", c["h"], "h")])
    assert same_tensor_bytes([(a["w"], "w", b["w"], "w")], chunk=4096)
